"""`beni demo`: materialize the whole asset graph into the instance at DAGSTER_HOME, as the UI would."""

import argparse
import sys

import dagster as dg

from beni_pipeline.definitions import defs
from beni_pipeline.defs.config import partition_range_tags


def materialize_all(
    instance: dg.DagsterInstance, op_config: dict[str, dict] | None = None, selection: dg.AssetSelection = dg.AssetSelection.all()
) -> list[dg.ExecuteInProcessResult]:
    """One run per stretch of the graph that shares a partitioning; partitioned stretches cover every partition.

    `op_config` maps an asset name to its config, as under `ops:` in a run config."""
    definitions = defs()
    graph = definitions.resolve_asset_graph()
    selected = selection.resolve(graph)
    assets = list(definitions.assets or []) + list(definitions.asset_checks or [])
    results = []
    for keys in _stages(graph, selected):
        partitions = graph.get(keys[0]).partitions_def
        tags = {}
        if partitions is not None:
            partition_keys = partitions.get_partition_keys(dynamic_partitions_store=instance)
            if not partition_keys:
                raise RuntimeError(f"{keys[0].to_user_string()} has no partitions yet; materialize its upstream assets first")
            tags = partition_range_tags(partition_keys[0], partition_keys[-1])
        names = {key.to_python_identifier() for key in keys}
        config = {"ops": {name: {"config": c} for name, c in (op_config or {}).items() if name in names}}
        result = dg.materialize(
            assets,
            instance=instance,
            selection=dg.AssetSelection.assets(*keys),
            tags=tags,
            run_config=config,
            resources=definitions.resources,
        )
        _print_summary(result)
        results.append(result)
    return results


def _print_summary(result: dg.ExecuteInProcessResult) -> None:
    """What a person wants after each run: each asset's numbers and each check's verdict."""
    shown = set()
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        if materialization.asset_key in shown:
            continue
        shown.add(materialization.asset_key)
        numbers = {k: v.value for k, v in materialization.metadata.items() if isinstance(v.value, (int, float))}
        print(f"{materialization.asset_key.to_user_string()}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))
        if "score" in materialization.metadata:  # an eval's own line: which categories it trained on and how they scored
            print(f"  score: {materialization.metadata['score'].value}")
        if "comparison" in materialization.metadata:  # both held-out sets and Tesseract, side by side
            print(f"  side by side: {materialization.metadata['comparison'].value}")
    for evaluation in result.get_asset_check_evaluations():
        verdict = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value})"
        print(f"  check {evaluation.check_name}: {verdict}")


def _stages(graph, selected: set[dg.AssetKey]) -> list[list[dg.AssetKey]]:
    stages: list[list[dg.AssetKey]] = []
    for key in (k for k in graph.toposorted_asset_keys if k in selected):
        if stages and graph.get(stages[-1][0]).partitions_def == graph.get(key).partitions_def:
            stages[-1].append(key)
        else:
            stages.append([key])
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beni", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="materialize every asset on the generated default corpus")
    serve = commands.add_parser("serve", help="serve a model over the OpenAI chat API, with a chat page at /")
    serve.add_argument(
        "model_dir", nargs="?", help="a saved beni model, quantized export or LLaVA export (default: the published final model)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", help="cuda or cpu (default: cuda where there is one)")
    serve.add_argument("--max-batch", type=int, default=32, help="sequences generated together")
    serve.add_argument("--max-waiting", type=int, default=64, help="requests queued for a slot before 503")
    serve.add_argument("--allow-private-networks", action="store_true", help="let image_url fetch from loopback and private addresses")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is fastest for small models on a busy CPU")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    materialize_all(dg.DagsterInstance.get())
    return 0


def _serve(args) -> int:
    import torch

    from beni_pipeline.defs.layout import DataLayout
    from beni_pipeline.prep.download import DownloadSettings
    from beni_pipeline.serve.app import ServeSettings, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or DataLayout().final_model
    images = DownloadSettings(retries=1, concurrency=16, allow_private_networks=args.allow_private_networks)
    settings = ServeSettings(max_batch=args.max_batch, max_waiting=args.max_waiting, images=images)
    try:
        serve(model_dir, args.host, args.port, settings, args.device)
    except (FileNotFoundError, ValueError) as e:  # no model there, or not one it can serve: the sentence says which
        print(f"beni serve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
