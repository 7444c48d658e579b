"""Tesseract (Debian's `tesseract-ocr`) scored on OCRBench-format sets by the same rule as the model
(beni_model.evaluate), as the classic-OCR baseline of the eval report. A question's prediction is all the text
Tesseract reads in the image, so a question answers right when its answer is in there, as the substring rule has it.

A machine without Tesseract (the GPU machine) takes the scores from one that has it. Either score the very sets a
run made (its data root's heldout/ and heldout_unseen*/, a few MB to copy):

    python -m beni_pipeline.prep.tesseract tesseract.json DATA/heldout DATA/heldout_unseen DATA/heldout_unseen_no_camera

or generate them here, as `heldout_eval_set` does, from the same seed, size, fonts and corpus answers:

    python -m beni_pipeline.prep.tesseract tesseract.json --generate /tmp/sets --fonts FONTS [--corpus DATA/corpus/corpus.jsonl]

Either writes {fingerprint of a set: its summary}; the eval report takes a summary only for a set with the same
fingerprint, so scores of other sets are never shown as this run's.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from multiprocessing.pool import ThreadPool
from pathlib import Path

from beni_model.evaluate import is_correct, load_set, similarity, summarize
from beni_pipeline.prep.files import write_text_atomic

# Page segmentation: one line for the recognition items, Tesseract's own layout analysis for pages and scenes.
PAGE_MODES = {"Key Information Extraction": 4, "Doc-oriented VQA": 3, "Scene Text-centric VQA": 11}
LINE_MODE = 7


def installed() -> bool:
    return shutil.which("tesseract") is not None


def fingerprint(eval_json: str | Path, image_root: str | Path) -> str:
    """Hash of the items and every image's bytes: equal only for the very same set."""
    digest = hashlib.sha256(Path(eval_json).read_bytes())
    for item in json.loads(Path(eval_json).read_text()):
        digest.update((Path(image_root) / item["image_path"]).read_bytes())
    return digest.hexdigest()


def read(task: tuple[str, int]) -> str:
    path, mode = task
    # One thread each: the pool runs one Tesseract per core.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run(["tesseract", path, "stdout", "--psm", str(mode)], capture_output=True, text=True, env=env)
    return " ".join(done.stdout.split())


def score(eval_json: str | Path, image_root: str | Path) -> dict:
    """Tesseract's summary on one set (beni_model.evaluate.summarize's, plus its fingerprint)."""
    if not installed():
        raise RuntimeError("tesseract is not installed: `apt-get install tesseract-ocr` (Debian) to score the classic-OCR baseline.")
    items = load_set(eval_json, image_root)
    tasks = [(str(Path(image_root) / i["image_path"]), PAGE_MODES.get(i["type"], LINE_MODE)) for i in items]
    with ThreadPool(os.cpu_count() or 1) as pool:  # threads: each only waits on its Tesseract process
        predictions = pool.map(read, tasks)
    records = [
        {
            **item,
            "prediction": p,
            "correct": is_correct(p, item["answers"], item["dataset_name"]),
            "similarity": similarity(p, item["answers"], item["dataset_name"]),
        }
        for item, p in zip(items, predictions)
    ]
    return {**summarize(records), "fingerprint": fingerprint(eval_json, image_root)}


def summaries(sets: dict[str, tuple[Path, Path]], scores_path: Path, score_missing: bool) -> tuple[dict[str, dict | None], str]:
    """Tesseract's summary of each set, name -> (json, image root), from the scores kept at `scores_path` by set
    fingerprint (None where there is none), and a note on them for the report. With `score_missing`, a set without
    scores is scored here where Tesseract is installed, and its scores kept."""
    known = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
    found, scored_here = {}, False
    for name, (eval_json, image_root) in sets.items():
        key = fingerprint(eval_json, image_root)
        if key not in known and score_missing and installed():
            known[key] = {"set": str(image_root), **score(eval_json, image_root)}
            scored_here = True
        found[name] = known.get(key)
    if scored_here:
        write_text_atomic(scores_path, json.dumps(known, indent=1) + "\n")
    if all(found.values()):
        return found, "scored by the same rule: " + ", ".join(f"{n} {100 * s['accuracy']:.1f}%" for n, s in found.items())
    fix = f"`python -m beni_pipeline.prep.tesseract {scores_path} {' '.join(str(root) for _, root in sets.values())}` on a machine that has it"
    if not installed():
        return found, f"tesseract not installed (apt-get install tesseract-ocr), and no scores for these sets in {scores_path}: run {fix}"
    return found, f"tesseract not scored on these sets: set tesseract: true in the eval config, or run {fix}"


def main(argv: list[str] | None = None) -> int:
    from beni_pipeline.prep.ocr_eval import EvalSetSettings, corpus_answers
    from beni_pipeline.prep.unseen_eval import make_sets  # both sets, as heldout_eval_set makes them

    parser = argparse.ArgumentParser(
        prog="python -m beni_pipeline.prep.tesseract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the JSON to write (an existing one keeps its other sets' scores)")
    parser.add_argument("sets", nargs="*", type=Path, help="set folders, each with ocr_eval.json and its images")
    parser.add_argument("--generate", type=Path, help="generate the held-out sets into this folder and score them")
    parser.add_argument(
        "--fonts", type=Path, default=os.environ.get("BENI_FONTS"), help="with --generate: the fonts root (default: $BENI_FONTS)"
    )
    parser.add_argument("--corpus", type=Path, help="with --generate: the run's corpus.jsonl, whose answers the sets avoid")
    parser.add_argument("--per-category", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folders = list(args.sets)
    if args.generate:
        exclude = corpus_answers(args.corpus) if args.corpus else set()
        sets = make_sets(
            args.generate / "heldout", args.generate / "heldout_unseen", args.fonts, EvalSetSettings(args.per_category, args.seed), exclude
        )
        folders += [json_path.parent for json_path in sets.values()]
    if not folders:
        parser.error("name set folders or --generate")
    scores = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for folder in folders:
        summary = score(folder / "ocr_eval.json", folder)
        scores[summary["fingerprint"]] = {"set": str(folder), **summary}
        print(f"tesseract on {folder}: {summary['correct']}/{summary['total']} ({100 * summary['accuracy']:.1f}%)")
    write_text_atomic(args.out, json.dumps(scores, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
