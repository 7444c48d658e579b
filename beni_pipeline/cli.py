"""beni: run the asset graph's jobs into the Dagster instance at DAGSTER_HOME (else ./dagster_home), as the UI would, and
say what happened.

beni demo                                   the whole graph on the generated corpus (dataset `demo`)
beni build --source rows.parquet            manifest, downloads of every chunk, dedup and shards of your rows
beni partitions [--dataset NAME]            the partition range of a dataset's chunks, for `dagster ... --partition-range`"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

import dagster as dg

from beni_pipeline.definitions import defs
from beni_pipeline.defs.config import partition_range_tags
from beni_pipeline.defs.layout import DATASET_NAME, DEFAULT_DATASET, DataLayout

# The jobs that make the graph, in the order they run: the manifest registers the chunks that `dataset_build` covers, so
# the two cannot share a run.
JOBS = ["dataset_source", "dataset_build", "train", "evaluate", "export"]


def materialize_all(
    instance: dg.DagsterInstance,
    op_config: dict[str, dict] | None = None,
    selection: dg.AssetSelection = dg.AssetSelection.all(),
    dataset: str = "",
) -> list[dg.ExecuteInProcessResult]:
    """One run of each named job that holds a selected asset, in order; a partitioned job covers every chunk of the dataset.
    Stops after a run that fails.

    `op_config` maps an asset name to its config, as under `ops:` in a run config; `dataset` names the dataset (empty: the
    layout's default)."""
    definitions = defs()
    selected = selection.resolve(definitions.resolve_asset_graph())
    layout = DataLayout(dataset=dataset)
    resources = {"layout": {"config": {"dataset": dataset}}} if dataset else {}
    results = []
    for name in JOBS:
        job = definitions.resolve_job_def(name)
        keys = job.asset_layer.executable_asset_keys & selected
        if not keys:
            continue
        tags = {}
        if any(job.asset_layer.get(key).partitions_def for key in keys):
            partitions = layout.partition_keys()
            if not partitions:
                raise RuntimeError(f"Dataset {layout.dataset_name!r} has no manifest chunks yet: materialize source_manifest first.")
            tags = partition_range_tags(partitions[0], partitions[-1])
        names = {key.to_python_identifier() for key in keys}
        config = {"ops": {n: {"config": c} for n, c in (op_config or {}).items() if n in names}, "resources": resources}
        result = job.execute_in_process(run_config=config, instance=instance, tags=tags, asset_selection=list(keys), raise_on_error=False)
        _print_summary(result)
        results.append(result)
        if not result.success:
            break
    return results


def _print_summary(result: dg.ExecuteInProcessResult) -> None:
    """What a person wants after each run: each asset's numbers and each check's verdict."""
    print(f"run {result.run_id[:8]} ({result.job_def.name}): {'succeeded' if result.success else 'FAILED'}")
    shown = set()
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        if materialization.asset_key in shown:
            continue
        shown.add(materialization.asset_key)
        print(
            f"{materialization.asset_key.to_user_string()}: {_numbers(materialization.metadata) or 'materialized (its tables are in the UI)'}"
        )
        if "score" in materialization.metadata:  # an eval's own line: which categories it trained on and how they scored
            print(f"  score: {materialization.metadata['score'].value}")
        if "comparison" in materialization.metadata:  # both held-out sets and Tesseract, side by side
            print(f"  side by side: {materialization.metadata['comparison'].value}")
    for evaluation in result.get_asset_check_evaluations():
        verdict = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value}: {_numbers(evaluation.metadata)})"
        print(f"  check {evaluation.check_name}: {verdict}")
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            print(
                f"  {event.step_key} failed: {error.message.strip().removeprefix(f'dagster._core.definitions.events.{error.cls_name}: ')}"
            )


def _numbers(metadata: dict) -> str:
    """Numbers and short texts; tables, previews and paths stay in the UI."""
    shown = {k: v.value for k, v in metadata.items() if isinstance(v.value, (int, float)) and not isinstance(v.value, bool)}
    shown |= {k: v.value for k, v in metadata.items() if isinstance(v, dg.TextMetadataValue) and len(v.value) <= 80}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def failed_errors(results: list[dg.ExecuteInProcessResult]) -> list[str]:
    """The ERROR-severity checks that failed, and the failed steps, each named."""
    failed = [
        f"check {e.check_name} of {e.asset_key.to_user_string()} failed"
        for result in results
        for e in result.get_asset_check_evaluations()
        if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR
    ]
    return failed + [f"run {result.job_def.name} failed" for result in results if not result.success]


def _instance() -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME, else at ./dagster_home (a checkout's, as `make` sets it), so that the UI shows the runs."""
    if not os.environ.get("DAGSTER_HOME"):
        if not Path("dagster_home", "dagster.yaml").is_file():
            raise SystemExit(
                "beni: DAGSTER_HOME is not set and ./dagster_home has no dagster.yaml: run beni from the checkout, or export DAGSTER_HOME=<a folder>."
            )
        os.environ["DAGSTER_HOME"] = str(Path("dagster_home").resolve())
    return dg.DagsterInstance.get()


def _dataset_name(text: str) -> str:
    if not DATASET_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain folder name: use letters, digits, '_', '-' or '.'")
    return text


def _default_dataset(source: Path) -> str:
    """A dataset named after its first source, so that a user's rows never land in the demo's dataset by default."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", source.stem).lstrip(".-") or "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beni", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="materialize every asset on the generated default corpus (dataset `demo`)")
    build = commands.add_parser("build", help="manifest -> downloads of every chunk -> dedup -> shards for your own rows")
    build.add_argument("--source", action="append", required=True, type=Path, help="a source file or folder (repeat for several)")
    build.add_argument(
        "--dataset", type=_dataset_name, help="the dataset's name and folder under the data root (default: the source's name)"
    )
    build.add_argument("--url-column", help="the column of image URLs or paths (default: url)")
    build.add_argument("--caption-column", help="the column of captions (default: caption)")
    build.add_argument("--config", default="{}", help='asset name -> config, e.g. \'{"downloaded": {"workers": 8}}\'')
    partitions = commands.add_parser("partitions", help="print the partition range of a dataset's chunks")
    partitions.add_argument("--dataset", type=_dataset_name, help="default: $BENI_DATASET, else demo")
    serve = commands.add_parser("serve", help="serve a model over the OpenAI chat API, with a chat page at /")
    serve.add_argument(
        "model_dir", nargs="?", help="a saved beni model, quantized export or LLaVA export (default: the published final model)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", help="cuda or cpu (default: cuda where there is one)")
    serve.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="float32 (default): batched answers equal generate's for each request alone; bfloat16: faster on a GPU, a greedy near-tie may flip",
    )
    serve.add_argument("--max-batch", type=int, default=32, help="sequences generated together")
    serve.add_argument("--max-waiting", type=int, default=64, help="requests queued for a slot before 503")
    serve.add_argument("--allow-private-networks", action="store_true", help="let image_url fetch from loopback and private addresses")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is fastest for small models on a busy CPU")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)

    if args.command == "partitions":
        layout = DataLayout(dataset=args.dataset or "")
        keys = layout.partition_keys()
        if not keys:
            print(f"Dataset {layout.dataset_name!r} has no chunks yet: materialize source_manifest first.", file=sys.stderr)
            return 1
        print(f"{keys[0]}...{keys[-1]}")
        return 0

    if args.command == "demo":
        results = materialize_all(_instance(), dataset=DEFAULT_DATASET)  # whatever BENI_DATASET says: the demo never mixes in
    else:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as e:
            parser.error(f"--config is not valid JSON ({e}); give an object of asset name -> config")
        missing = [s for s in args.source if not s.exists()]
        if missing:
            parser.error(f"source {missing[0]} does not exist; check the path")
        manifest = config.setdefault("source_manifest", {})
        manifest["sources"] = [str(s.resolve()) for s in args.source]
        manifest |= {k: v for k, v in (("url_column", args.url_column), ("caption_column", args.caption_column)) if v}
        dataset = args.dataset or _default_dataset(args.source[0])
        print(f"dataset {dataset}: {DataLayout(dataset=dataset).base}")
        selection = dg.AssetSelection.groups("data")
        results = materialize_all(_instance(), config, selection, dataset)
    failed = failed_errors(results)
    for line in failed:
        print(f"beni {args.command}: {line}", file=sys.stderr)
    return 1 if failed else 0


def _serve(args) -> int:
    import torch

    from beni_pipeline.prep.download import DownloadSettings
    from beni_pipeline.serve.app import ServeSettings, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or DataLayout().final_model
    images = DownloadSettings(retries=1, concurrency=16, allow_private_networks=args.allow_private_networks)
    settings = ServeSettings(max_batch=args.max_batch, max_waiting=args.max_waiting, images=images)
    try:
        serve(model_dir, args.host, args.port, settings, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as e:  # no model there, or not one it can serve: the sentence says which
        print(f"beni serve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
