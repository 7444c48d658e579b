"""The recipe end to end through the product's own path: every asset of the Dagster graph materialized by
`beni_pipeline.cli.materialize_all` (what `beni demo` and the UI's "Materialize all" run), then each asset's step
time and the eval report's scores read back from the Dagster instance.

    python bench/recipe.py --data /tmp/run                       # the defaults: the GPU recipe on a GPU machine
    python bench/recipe.py --data /tmp/run --samples 300         # a CPU machine runs the tiny recipe the same way
    python bench/recipe.py --data /tmp/run --config '{"trained_model": {"max_steps": 100}}'
    BENI_FONTS=/path/to/fonts python bench/recipe.py --data /tmp/run   # fetched fonts: the corpus draws the train split,
                                                                        # and the report adds the unseen-renderer set

With fetched fonts (python -m beni_pipeline.prep.fonts fetch) results.md also has both held-out sets side by side, per
category, with Tesseract's scores where the data root's ocr_eval/tesseract.json has them (python -m beni_pipeline.prep.tesseract).

`--config` is the run config of each asset (asset name -> its config, as under `ops:` in the launchpad). The data root
(`BENI_DATA`) and the Dagster instance (`DAGSTER_HOME`, with the project's dagster.yaml) live under --data, so a run
cut off by a machine's time limit continues where it stopped (each asset resumes) when started again.
Writes results.json and results.md under --data.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from beni_model.evaluate import side_by_side_markdown

REPO = Path(__file__).resolve().parents[1]


def step_seconds(instance, run_id: str) -> dict[str, float]:
    """Each step's wall time in a run, from its start and success events."""
    starts, seconds = {}, {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or entry.step_key is None:
            continue
        if event.event_type_value == "STEP_START":
            starts[entry.step_key] = entry.timestamp
        elif event.event_type_value == "STEP_SUCCESS":
            seconds[entry.step_key] = round(entry.timestamp - starts[entry.step_key], 1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "bench" / "out" / "recipe")
    parser.add_argument("--samples", type=int, help="size of the generated corpus (default: the asset's, which follows the machine)")
    parser.add_argument("--config", default="{}", help='asset name -> config, e.g. \'{"trained_model": {"max_steps": 100}}\'')
    args = parser.parse_args()

    data = args.data.resolve()
    home = data / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home)
    os.environ["BENI_DATA"], os.environ["DAGSTER_HOME"] = str(data), str(home)
    config = json.loads(args.config)
    if args.samples:
        config.setdefault("source_manifest", {})["corpus_samples"] = args.samples

    import dagster as dg  # after DAGSTER_HOME is set

    from beni_pipeline.cli import materialize_all
    from beni_pipeline.defs.layout import DataLayout

    start = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        results = materialize_all(instance, config)
        seconds = {}
        for result in results:
            seconds.update(step_seconds(instance, result.run_id))
        metadata = {}
        for result in results:
            for event in result.get_asset_materialization_events():
                m = event.materialization
                # numbers and short texts: the previews and thumbnails stay in the instance
                metadata[m.asset_key.to_user_string()] = {
                    k: v.value
                    for k, v in m.metadata.items()
                    if isinstance(v.value, int | float) or (isinstance(v.value, str) and len(v.value) < 200)
                }
        checks = {e.check_name: e.passed for result in results for e in result.get_asset_check_evaluations()}
    total = round(time.perf_counter() - start, 1)
    summary = json.loads((DataLayout().ocr_eval / "summary.json").read_text())
    comparison = DataLayout().comparison / "comparison.json"
    record = {"seconds": seconds, "total_seconds": total, "checks": checks, "metadata": metadata, "eval": summary}
    if comparison.is_file():
        record["comparison"] = json.loads(comparison.read_text())
    (data / "results.json").write_text(json.dumps(record, indent=1, default=str))
    (data / "results.md").write_text(results_markdown(record))
    print((data / "results.md").read_text())


def results_markdown(record: dict) -> str:
    trained, report, summary = record["metadata"].get("trained_model", {}), record["metadata"].get("ocr_eval_report", {}), record["eval"]
    lines = [
        f"recipe `{trained.get('recipe')}`: {summary['correct']}/{summary['total']} = {100 * summary['accuracy']:.1f}% on the "
        f"{report.get('eval_set', 'eval set')}; {record['total_seconds']} s for the whole graph",
        "",
        "| asset | seconds |",
        "|---|---|",
        *(f"| {step} | {s} |" for step, s in record["seconds"].items()),
        "",
        "| check | passed |",
        "|---|---|",
        *(f"| {name} | {passed} |" for name, passed in record["checks"].items()),
        "",
        "| category | accuracy | similarity |" + (" reading head |" if "head_accuracy" in summary else ""),
        "|---|---|---|" + ("---|" if "head_accuracy" in summary else ""),
    ]
    for category, r in summary["by_type"].items():
        head = f" {100 * r['head_accuracy']:.0f}% |" if "head_accuracy" in r else ""
        lines.append(f"| {category} | {100 * r['accuracy']:.0f}% ({r['correct']}/{r['total']}) | {r['similarity']:.2f} |{head}")
    if comparison := record.get("comparison"):
        lines += ["", side_by_side_markdown(comparison["rows"]), f"Tesseract: {comparison['tesseract']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
