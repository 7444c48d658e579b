"""A modern OCR engine on the report's held-out sets, for scale beside Tesseract: RapidOCR's PP-OCRv4 pipeline as it
ships (text detection, angle classifier, recognizer; trained on real text, nothing of ours), scored by the report's
rule (beni_model.evaluate). As for Tesseract, a question's prediction is all the text the engine reads, top to bottom
and left to right, so a question is right when its answer is in there: an upper bound on what a reader that finds
the answer among those reads would score.

    pip install rapidocr_onnxruntime==1.4.4     # with its dependencies: onnxruntime, opencv, pyclipper, shapely
    python bench/ppocr_sets.py --fonts FONTS [--per-category 40] [--out /tmp/ppocr]

The sets are drawn as `heldout_eval_set` draws them (same seed and size; without a run's corpus, no answers are
excluded, so a few items can differ from a run's). Prints each set's score and its per-category table; writes each
set's predictions to --out.
"""

import argparse
import json
import time
from pathlib import Path

from beni_model.evaluate import is_correct, load_set, similarity, summarize
from beni_pipeline.prep.ocr_eval import EvalSetSettings
from beni_pipeline.prep.unseen_eval import make_sets


def read_all(engine, path: Path) -> str:
    found, _ = engine(str(path))
    # Reading order: rows of boxes (tops within a third of a typical line), each left to right.
    boxes = sorted(found or [], key=lambda r: (round(min(p[1] for p in r[0]) / 12), min(p[0] for p in r[0])))
    return " ".join(text for _, text, _ in boxes)


def main() -> None:
    from rapidocr_onnxruntime import RapidOCR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fonts", type=Path, required=True, help="the fetched fonts (python -m beni_pipeline.prep.fonts fetch)")
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/ppocr"))
    args = parser.parse_args()

    settings = EvalSetSettings(args.per_category, args.seed)
    sets = make_sets(args.out / "heldout", args.out / "heldout_unseen", args.fonts, settings)
    engine = RapidOCR()
    summaries = {}
    for name, eval_json in sets.items():
        root, started = eval_json.parent, time.perf_counter()
        records = []
        for item in load_set(eval_json, root):
            p = read_all(engine, root / item["image_path"])
            ok = is_correct(p, item["answers"], item["dataset_name"])
            records.append({**item, "prediction": p, "correct": ok, "similarity": similarity(p, item["answers"], item["dataset_name"])})
        (args.out / f"{name}_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summaries[name] = summarize(records)
        s = summaries[name]
        print(f"{name}: {s['correct']}/{s['total']} = {100 * s['accuracy']:.1f}% ({time.perf_counter() - started:.0f} s)", flush=True)
    print("\n| category | " + " | ".join(summaries) + " |")
    print("|---" * (len(summaries) + 1) + "|")
    for category in next(iter(summaries.values()))["by_type"]:
        cells = [f"{100 * s['by_type'][category]['accuracy']:.0f}%" for s in summaries.values()]
        print(f"| {category} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
