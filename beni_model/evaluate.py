"""OCRBench-style evaluation: batched greedy generation (transformers' generate, through the model's processor) over an
OCRBench-format JSON, scored with OCRBench's rule.

The set is a JSON list of items with the official file's fields: `dataset_name`, `id`, `image_path` (relative to an
image root), `question`, `answers` (a string or a list of strings) and `type` (the category).
"""

import difflib
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from beni_model.chat import IMAGE_MARKER, prompt_text
from beni_model.data import decode_image
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import load_processor

FIELDS = ("dataset_name", "id", "image_path", "question", "answers", "type")
OCRBENCH_SIZE = 1000  # the real OCRBench; its official script prints a score out of 1000 only for the full set


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 16
    max_new_tokens: int = 32  # OCRBench answers are words, numbers and short phrases
    compile_decode: bool = False  # generate over a static cache, compiled on a GPU (a minute per shape: long evals only)


# ---------------------------------------------------------------- the set


def load_set(json_path: str | Path, image_root: str | Path) -> list[dict]:
    """The items of an OCRBench-format JSON, checked: every field present and every image file there."""
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"No OCRBench-format JSON at {json_path}: point the eval at OCRBench.json or generate the held-out set.")
    items = json.loads(json_path.read_text())
    if not isinstance(items, list) or not items:
        raise ValueError(f"{json_path} must hold a non-empty JSON list of OCRBench items.")
    for i, item in enumerate(items):
        missing = [f for f in FIELDS if f not in item]
        if missing:
            raise ValueError(f"Item {i} of {json_path} lacks {missing}: OCRBench items need the fields {list(FIELDS)}.")
        if not (image_root / item["image_path"]).is_file():
            raise FileNotFoundError(
                f"Item {i} of {json_path} names the image {item['image_path']!r}, which is not under {image_root}: check the image root."
            )
    return items


# ---------------------------------------------------------------- OCRBench's rule


def normalize(text: str, dataset_name: str) -> str:
    """OCRBench's normalization, as in the official scoring loop (github.com/Yuliang-Liu/MultimodalOCR,
    OCRBench/example.py at commit f5cbec66, the `for i in range(len(data))` loop after the workers join, about
    lines 120-151): HME100k (handwritten maths) keeps case, strips, and drops every space and newline; every other
    set is lower-cased, stripped, with newlines turned into spaces. An item is right when any normalized answer is a
    substring of the normalized prediction; the x/1000 total is printed only when the set has 1000 items."""
    if dataset_name == "HME100k":
        return text.strip().replace("\n", " ").replace(" ", "")
    return text.lower().strip().replace("\n", " ")


def is_correct(prediction: str, answers: str | list[str], dataset_name: str) -> bool:
    """OCRBench: correct when any ground-truth answer, normalized, is a substring of the normalized prediction."""
    answers = [answers] if isinstance(answers, str) else answers
    predicted = normalize(prediction, dataset_name)
    return any(normalize(answer, dataset_name) in predicted for answer in answers)


def similarity(prediction: str, answers: str | list[str], dataset_name: str) -> float:
    """Not OCRBench's: how close the prediction comes to the nearest answer, difflib's ratio of the normalized texts
    (1.0 the same, 0.0 nothing in common), so a model that reads in part is told from one that reads nothing."""
    answers = [answers] if isinstance(answers, str) else answers
    predicted = normalize(prediction, dataset_name)
    return max(difflib.SequenceMatcher(None, predicted, normalize(a, dataset_name)).ratio() for a in answers)


def summarize(records: list[dict], trained: set[str] | None = None) -> dict:
    """Total and per-category (`type`) and per-dataset counts of correct answers, with the mean similarity. Given the
    categories the model's training data covers (`trained`), each category says whether it is one of them, and the
    summary scores those categories alone too (`trained_on`)."""
    by_type, by_dataset, heads = defaultdict(lambda: [0, 0, 0.0]), defaultdict(lambda: [0, 0, 0.0]), defaultdict(list)
    for r in records:
        for table, key in ((by_type, r["type"]), (by_dataset, r["dataset_name"])):
            table[key][0] += r["correct"]
            table[key][1] += 1
            table[key][2] += r["similarity"]
        if "head_correct" in r:
            heads[r["type"]].append(r["head_correct"])
    correct = sum(r["correct"] for r in records)

    def rows(table):
        return {
            k: {"correct": c, "total": n, "accuracy": round(c / n, 4), "similarity": round(sim / n, 3)}
            for k, (c, n, sim) in sorted(table.items())
        }

    summary = {
        "correct": correct,
        "total": len(records),
        "accuracy": round(correct / len(records), 4),
        "similarity": round(sum(r["similarity"] for r in records) / len(records), 3),
        "by_type": rows(by_type),
        "by_dataset": rows(by_dataset),
    }
    if heads:
        summary["head_accuracy"] = round(sum(map(sum, heads.values())) / len(records), 4)
        for category, right in heads.items():
            summary["by_type"][category]["head_accuracy"] = round(sum(right) / len(right), 4)
    if len(records) == OCRBENCH_SIZE:
        summary["ocrbench_score"] = correct  # out of 1000, the number papers report
    if trained is not None:
        for category, row in summary["by_type"].items():
            row["trained_on"] = category in trained
        taught = [r for r in records if r["type"] in trained]
        summary["trained_on"] = {
            "categories": sorted(c for c in summary["by_type"] if c in trained),
            "correct": sum(r["correct"] for r in taught),
            "total": len(taught),
            "accuracy": round(sum(r["correct"] for r in taught) / len(taught), 4) if taught else 0.0,
        }
    return summary


# ---------------------------------------------------------------- generation


def question_prompt(question: str, processor) -> str:
    return prompt_text([{"from": "human", "value": f"{IMAGE_MARKER}\n{question}"}], processor)


def placement(model) -> tuple[torch.device, torch.dtype]:
    """Where the model's inputs go: its device and its floating-point dtype (quantized weights are not floats)."""
    return next(model.parameters()).device, next(p for p in model.parameters() if p.is_floating_point()).dtype


@torch.no_grad()
def greedy(model, inputs: dict, settings: EvalSettings, tokenizer) -> torch.LongTensor:
    """Prompt ids + greedy new tokens through transformers' `generate`, for beni models and LLaVA exports alike; with
    `compile_decode` over a static cache, which transformers compiles on a GPU."""
    static = {"cache_implementation": "static"} if settings.compile_decode else {}
    return model.generate(
        **inputs,
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **static,
    )


def generate_tokens(
    model, processor, items: list[dict], image_root: str | Path, settings: EvalSettings = EvalSettings()
) -> tuple[list[list[int]], list[str] | None]:
    """The greedy answer tokens (through the first end-of-turn token) of each item, in the items' order: batches of
    prompts of similar length, left-padded, through the processor and `greedy`, for beni models and LLaVA exports
    alike. Also each image's answer by the model's extensions (`extension_answers`), from the same pixel values, for a
    beni model whose extensions answer (else None)."""
    device, dtype = placement(model)
    tokenizer = processor.tokenizer
    prompts = [question_prompt(item["question"], processor) for item in items]
    # Every prompt holds one image, whose tokens are the same count in each: the text alone orders them by length.
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(items)), key=lambda i: -lengths[i])  # longest first: an out-of-memory shows at once
    answers = [[] for _ in items]
    heads = [""] * len(items) if isinstance(model, BeniForConditionalGeneration) and len(model.extensions) else None
    for start in range(0, len(order), settings.batch_size):
        rows = order[start : start + settings.batch_size]
        images = [decode_image((Path(image_root) / items[i]["image_path"]).read_bytes()) for i in rows]
        inputs = processor(
            text=[prompts[i] for i in rows], images=images, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
        ).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        tokens = greedy(model, inputs, settings, tokenizer)
        for i, new in zip(rows, tokens[:, inputs["input_ids"].shape[1] :].cpu().tolist()):
            answers[i] = new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new
        if heads is not None:
            if (own := model.extension_answers(inputs["pixel_values"])) is None:
                heads = None
            else:
                for i, answer in zip(rows, own):
                    heads[i] = answer
    return answers, heads


# ---------------------------------------------------------------- models


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_eval(model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, processor) from a saved beni folder, a quantized export of one, or a LLaVA export, ready to generate:
    in `dtype` (default: bf16 on a GPU, float32 on CPU); every part frozen (inference only)."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No model at {model_dir}: expected a save_pretrained folder with config.json.")
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if json.loads(config_file.read_text()).get("model_type") == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, device_map=device)
    else:
        # Freezing here also spares quantized (integer) weights the requires_grad that they cannot take.
        model = BeniForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, device_map=device, freeze_vision=True, freeze_connector=True, freeze_text=True
        )
    llava = isinstance(model, LlavaForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(model_dir) if llava else load_processor(model_dir, model.config)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    expected = model.config.image_token_index if llava else model.config.image_token_id
    if processor.image_token_id != expected:
        raise ValueError(
            f"The processor in {model_dir} maps {processor.image_token!r} to {processor.image_token_id}, not the model's image token id {expected}: save the training processor with the model."
        )
    return model.eval(), processor


# ---------------------------------------------------------------- the run and its report


@dataclass
class EvalResult:
    summary: dict
    predictions: Path
    summary_path: Path
    report: Path


def evaluate(
    model,
    processor,
    json_path: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    settings: EvalSettings = EvalSettings(),
    title: str = "OCRBench-style evaluation",
    trained: set[str] | None = None,
) -> EvalResult:
    """Generate an answer for every item, score it with OCRBench's rule and write predictions.jsonl (one line per
    item), summary.json and report.md into `out_dir`. A model whose extensions answer (Extension.answers, e.g. a
    head's transcript) also has that answer scored by the same rule (`head_answer`, `head_correct`;
    `head_accuracy` overall and by category): whether the vision tower's head gets it, apart from whether the LLM
    passes it on. `trained`: the categories the model's training data covers, when known (see `summarize`)."""
    items = load_set(json_path, image_root)
    start = time.perf_counter()
    tokens, heads = generate_tokens(model, processor, items, image_root, settings)
    seconds = time.perf_counter() - start
    predictions = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    generated = sum(len(t) for t in tokens)
    records = [
        {
            **{f: item[f] for f in FIELDS},
            "prediction": prediction,
            "correct": is_correct(prediction, item["answers"], item["dataset_name"]),
            "similarity": round(similarity(prediction, item["answers"], item["dataset_name"]), 3),
        }
        for item, prediction in zip(items, predictions)
    ]
    if heads is not None:
        for record, answer in zip(records, heads):
            record.update(head_answer=answer, head_correct=is_correct(answer, record["answers"], record["dataset_name"]))
    summary = summarize(records, trained)
    summary.update(
        eval_set=str(Path(json_path).resolve()),
        seconds=round(seconds, 3),
        samples_per_s=round(len(items) / seconds, 3),
        generated_tokens=generated,
        tokens_per_s=round(generated / seconds, 2),
        settings=asdict(settings),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = EvalResult(summary, out_dir / "predictions.jsonl", out_dir / "summary.json", out_dir / "report.md")
    result.predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    result.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    result.report.write_text(report_markdown(summary, records, title))
    return result


def side_by_side(columns: dict[str, dict | None]) -> list[dict]:
    """One row per category (and a last one, "all"): each column's accuracy (None where that column has no summary or
    no such category), and `gap`, the first column's accuracy less the second's, in points. `columns`: name -> summary
    (see `summarize`), e.g. {"same generator": ..., "unseen renderer": ..., "tesseract, same generator": ...}."""
    names = list(columns)
    categories = list(dict.fromkeys(c for summary in columns.values() if summary for c in summary["by_type"]))
    rows = []
    for category in categories + ["all"]:
        row = {"type": category}
        for name, summary in columns.items():
            scores = summary if category == "all" else (summary or {}).get("by_type", {}).get(category)
            row[name] = scores["accuracy"] if summary and scores else None
        first, second = row[names[0]], row[names[1]] if len(names) > 1 else None
        row["gap"] = round(100 * (first - second), 1) if first is not None and second is not None else None
        rows.append(row)
    return rows


def side_by_side_markdown(rows: list[dict]) -> str:
    names = [k for k in rows[0] if k not in ("type", "gap")]
    lines = ["| category | " + " | ".join(names) + " | gap (points) |", "|---|" + "---|" * (len(names) + 1)]
    for row in rows:
        cells = ["-" if row[n] is None else f"{100 * row[n]:.0f}%" for n in names] + ["-" if row["gap"] is None else f"{row['gap']:+.1f}"]
        lines.append(f"| {row['type']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_line(rows: list[dict]) -> str:
    """The last `side_by_side` row ("all") in one line: each column's accuracy and the gap between the first two."""
    total = rows[-1]
    parts = [f"{name} {'not scored' if v is None else f'{100 * v:.1f}%'}" for name, v in total.items() if name not in ("type", "gap")]
    return " | ".join(parts) + ("" if total["gap"] is None else f" | gap {total['gap']:+.1f} points")


def score_line(summary: dict) -> str:
    line = f"{summary['correct']}/{summary['total']} ({100 * summary['accuracy']:.1f}%, similarity {summary['similarity']:.2f})"
    if "ocrbench_score" in summary:
        line += f", OCRBench score {summary['ocrbench_score']}/1000"
    if trained_on := summary.get("trained_on"):
        rows = [f"{k} {v['correct']}/{v['total']}" for k, v in summary["by_type"].items() if v["trained_on"]]
        untrained = len(summary["by_type"]) - len(rows)
        line += f"; trained on: {', '.join(rows) or 'none'} ({100 * trained_on['accuracy']:.1f}%); {untrained} categories not trained on"
    return line


def report_markdown(summary: dict, records: list[dict], title: str, examples: int = 5) -> str:
    lines = [f"# {title}", "", f"Eval set: `{summary['eval_set']}`", "", f"**Score: {score_line(summary)}**", ""]
    lines += [f"{summary['samples_per_s']} samples/s, {summary['tokens_per_s']} generated tokens/s", ""]
    if "head_accuracy" in summary:
        lines += [f"The extension head's own answers, scored the same way: {100 * summary['head_accuracy']:.1f}%", ""]
    for heading, key, label in (("By category", "by_type", "type"), ("By dataset", "by_dataset", "dataset")):
        head = key == "by_type" and "head_accuracy" in summary
        marked = key == "by_type" and "trained_on" in summary
        lines += [
            f"## {heading}",
            "",
            f"| {label} | correct | total | accuracy | similarity |"
            + (" extension head |" if head else "")
            + (" trained on |" if marked else ""),
            "|---|---|---|---|---|" + ("---|" if head else "") + ("---|" if marked else ""),
        ]
        lines += [
            f"| {k} | {v['correct']} | {v['total']} | {100 * v['accuracy']:.1f}% | {v['similarity']:.2f} |"
            + (f" {100 * v.get('head_accuracy', 0):.1f}% |" if head else "")
            + ((" yes |" if v["trained_on"] else " no: the training data has none |") if marked else "")
            for k, v in summary[key].items()
        ]
        lines.append("")
    for heading, correct in (("Right answers", True), ("Wrong answers", False)):
        chosen = [r for r in records if r["correct"] == correct][:examples]
        lines += [f"## {heading} (first {len(chosen)})", "", "| type | question | answers | prediction |", "|---|---|---|---|"]
        lines += [
            f"| {r['type']} | {_cell(r['question'])} | {_cell(json.dumps(r['answers'], ensure_ascii=False))} | {_cell(r['prediction'])} |"
            for r in chosen
        ]
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]


def read_predictions(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
