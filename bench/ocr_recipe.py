"""The default GPU recipe end to end: generate the corpus, prepare it with the data assets' own functions, train
the recipe's stages under torchrun, score every stage's model on the held-out OCRBench-style set.

    python bench/ocr_recipe.py prepare  --data /tmp/ocr --samples 120000   # corpus -> manifest -> downloads -> dedup -> shards
    python bench/ocr_recipe.py train    --data /tmp/ocr                    # the recipe's stages, one after another
    python bench/ocr_recipe.py evaluate --data /tmp/ocr                    # results.md + results.json in --data

`--override '{"finetune": {"max_steps": 1500}}'` changes a stage's fields for train and evaluate alike (ablations);
`--stages finetune` trains or evaluates that stage alone, from the stage before it as already trained under --data.

Each step returns at once when its output is complete (the corpus, downloads and stages resume), so a run cut
off by a machine's time limit continues where it stopped. On a CPU machine `--recipe tiny --samples 300` runs
the same path in minutes.
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from beni_model.config import BeniConfig
from beni_model.evaluate import EvalSettings, evaluate, load_for_eval, score_line
from beni_model.train import torchrun_command
from beni_model.training.config import TrainConfig
from beni_pipeline.defs.training.recipes import RECIPES
from beni_pipeline.prep.dedup import DedupSettings, find_duplicates, kept_ids, write_chunk_features
from beni_pipeline.prep.download import DownloadSettings, download_chunk, read_index
from beni_pipeline.prep.ingest import SourceSettings, build_manifest, read_chunk
from beni_pipeline.prep.ocr_eval import EvalSetSettings, corpus_answers, find_overlaps, generate_eval_set
from beni_pipeline.prep.shard import ShardSettings, plan_shards, write_shards
from beni_pipeline.prep.synthetic import CorpusSettings, generate_corpus


def stages(args) -> list[dict]:
    """The recipe's stages, with --override's fields (a JSON object: stage name -> TrainConfig fields) applied."""
    changes = json.loads(args.override)
    recipe = RECIPES[args.recipe](args.data / "parts")
    if unknown := set(changes) - {stage["name"] for stage in recipe}:
        raise SystemExit(f"--override names stages {sorted(unknown)} that recipe {args.recipe} lacks")
    return [{**stage, **changes.get(stage["name"], {})} for stage in recipe]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(times: dict, name: str, fn, *a, **kw):
    start = time.perf_counter()
    result = fn(*a, **kw)
    times[name] = round(time.perf_counter() - start, 1)
    log(f"{name}: {times[name]} s")
    return result


def chunk_features(root: Path, chunk: str, settings: DedupSettings) -> Path:
    path = root / "dedup" / "features" / f"{chunk}.parquet"
    if not path.exists():
        write_chunk_features(read_chunk(root / "manifest", chunk), root / "downloaded" / chunk, path, settings)
    return path


def prepare(args) -> None:
    root, times = args.data, {}
    corpus = timed(times, "corpus", generate_corpus, root / "corpus", CorpusSettings(samples=args.samples, seed=args.seed))
    manifest = timed(times, "manifest", build_manifest, [corpus], root / "manifest", SourceSettings(chunk_size=args.chunk_size))
    download, dedup, counts = DownloadSettings(), DedupSettings(), Counter()
    start = time.perf_counter()
    for chunk in manifest.chunks:
        counts.update(download_chunk(read_chunk(root / "manifest", chunk), root / "downloaded" / chunk, download).counts)
    times["download"] = round(time.perf_counter() - start, 1)
    log(f"download: {times['download']} s, {dict(counts)}")
    start = time.perf_counter()
    with ProcessPoolExecutor(min(len(manifest.chunks), os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")) as pool:
        features = list(pool.map(chunk_features, [root] * len(manifest.chunks), manifest.chunks, [dedup] * len(manifest.chunks)))
    result = find_duplicates(features, dedup, work_dir=root / "dedup")
    kept = pa.concat_arrays([kept_ids(path, result) for path in features])
    times["dedup"] = round(time.perf_counter() - start, 1)
    log(f"dedup: {times['dedup']} s, {len(kept)} kept of {manifest.table.num_rows}")
    first = stages(args)[0]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or first["text_model"])
    model_parts = {k: first[k] for k in ("vision_config", "connector", "image_size") if k in first}
    extensions = {name: {k: v for k, v in s.items() if k != "weight"} for name, s in first.get("extensions", {}).items()}
    beni = BeniConfig(text_model=args.tokenizer or first["text_model"], extensions=extensions, **model_parts)
    index = pa.concat_tables([read_index(root / "downloaded" / chunk) for chunk in manifest.chunks])
    shard_settings = ShardSettings(image_tokens=beni.num_image_tokens())
    plan = timed(
        times, "plan_shards", plan_shards, pq.read_table(root / "manifest" / "manifest.parquet"), index, kept, tokenizer, shard_settings
    )
    shard_index = timed(times, "write_shards", write_shards, plan, root / "downloaded", root / "shards", shard_settings)
    lengths = plan.column("length").to_numpy()
    summary = {
        "samples": args.samples,
        "downloaded": dict(counts),
        "kept": len(kept),
        "shards": len(shard_index["shardlist"]),
        "tokens_per_sample_mean": round(float(lengths.mean()), 1),
        "tokens_per_sample_max": int(lengths.max()),
        "seconds": times,
        "cpus": os.cpu_count(),
    }
    (root / "prepare.json").write_text(json.dumps(summary, indent=1))
    log(json.dumps(summary))


def train(args) -> None:
    root, previous = args.data, None
    record = root / "train.json"  # stages trained alone keep the times of those trained before
    times = json.loads(record.read_text())["seconds"] if args.stages and record.is_file() else {}
    for stage in stages(args):
        name = stage.pop("name")
        out = root / "training" / name
        if args.stages and name not in args.stages:
            previous = out / "final"
            continue
        config = TrainConfig(shards=str(root / "shards"), output_dir=str(out), **stage)
        config.init_from = str(previous) if previous else None
        config.validate()
        path = root / "training" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(config), indent=1))
        log(f"stage {name}: {config.max_steps} steps of {config.batch_size}")
        timed(times, name, subprocess.run, torchrun_command(path, args.processes), check=True)
        previous = out / "final"
    record.write_text(json.dumps({"seconds": times, "total_seconds": round(sum(times.values()), 1)}, indent=1))


def evaluate_stages(args) -> None:
    root = args.data
    corpus = root / "corpus" / "corpus.jsonl"
    eval_dir = root / "heldout"
    eval_json = generate_eval_set(eval_dir, EvalSetSettings(args.per_category, seed=args.seed), corpus_answers(corpus))
    if overlaps := find_overlaps(eval_json, eval_dir, corpus):
        raise SystemExit(f"held-out set overlaps the corpus: {overlaps[:3]}")
    results = {}
    for stage in stages(args):
        if args.stages and stage["name"] not in args.stages:
            continue
        model, tokenizer = load_for_eval(root / "training" / stage["name"] / "final")
        result = evaluate(model, tokenizer, eval_json, eval_dir, root / "eval" / stage["name"], EvalSettings(batch_size=args.batch_size))
        results[stage["name"]] = result.summary
        log(f"{stage['name']}: {score_line(result.summary)}")
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "results.md").write_text(results_markdown(args, results))
    log((root / "results.md").read_text())


def results_markdown(args, results: dict) -> str:
    root = args.data
    prepared = json.loads((root / "prepare.json").read_text())
    trained = json.loads((root / "train.json").read_text())
    lines = [
        f"recipe `{args.recipe}`: {prepared['samples']} generated samples, {prepared['kept']} kept, {prepared['tokens_per_sample_mean']} "
        + f"tokens per sample; training {trained['total_seconds']} s in all",
        "",
    ]
    lines += ["| stage | steps | train seconds | tokens/s | final loss | held-out score |", "|---|---|---|---|---|---|"]
    for name, summary in results.items():
        metrics = json.loads((root / "training" / name / "summary.json").read_text())
        cells = [
            metrics["steps"],
            trained["seconds"][name],
            round(metrics["tokens_per_s"]),
            f"{metrics['final_loss']:.3f}",
            score_line(summary),
        ]
        lines.append(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    categories = list(next(iter(results.values()))["by_type"])
    heads = [name for name, r in results.items() if "head_accuracy" in r]
    lines += [
        "",
        "Per category: accuracy (mean similarity to the answer, 0-1), and the reading head's own transcript scored the same way.",
        "",
        "| category | " + " | ".join(list(results) + [f"{name}: head" for name in heads]) + " |",
        "|---|" + "---|" * (len(results) + len(heads)),
    ]
    for category in categories:
        cells = [f"{100 * r['by_type'][category]['accuracy']:.0f}% ({r['by_type'][category]['similarity']:.2f})" for r in results.values()]
        cells += [f"{100 * results[name]['by_type'][category]['head_accuracy']:.0f}%" for name in heads]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "train", "evaluate"])
    parser.add_argument("--data", type=Path, default=Path("bench/out/ocr"))
    parser.add_argument("--recipe", default="smollm2-siglip", choices=sorted(RECIPES))
    parser.add_argument("--samples", type=int, default=120_000)
    parser.add_argument("--chunk-size", type=int, default=10_000, help="manifest rows per download chunk")
    parser.add_argument("--tokenizer", help="folder of the recipe's LLM tokenizer and config (default: the recipe's LLM)")
    parser.add_argument("--override", default="{}", help='stage fields to change, e.g. \'{"finetune": {"max_steps": 3000}}\'')
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--per-category", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64, help="eval batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="*", help="train or evaluate only these stages (default: every stage); a stage trained alone starts from the final model of the stage before it")
    args = parser.parse_args()
    {"prepare": prepare, "train": train, "evaluate": evaluate_stages}[args.step](args)


if __name__ == "__main__":
    main()
