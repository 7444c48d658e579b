import dagster as dg

from beni_pipeline.defs.config import partition_range_tags
from beni_pipeline.defs.data.assets import deduplicated, downloaded, source_manifest, training_shards

dataset_source = dg.define_asset_job(
    "dataset_source", selection=dg.AssetSelection.assets(source_manifest), description="Re-read the sources into the manifest."
)
dataset_build = dg.define_asset_job(
    "dataset_build",
    selection=dg.AssetSelection.assets(downloaded, deduplicated, training_shards),
    description="Download every manifest chunk, deduplicate and shard, in one run over all partitions.",
)

dataset_rebuild = dg.ScheduleDefinition(
    name="dataset_rebuild",
    job=dataset_source,
    cron_schedule="0 3 * * *",
    description="Rebuild the dataset nightly: the manifest first, then `build_dataset_after_manifest` runs the rest.",
)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[dataset_source],
    request_job=dataset_build,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def build_dataset_after_manifest(context: dg.RunStatusSensorContext) -> dg.RunRequest:
    """Once the manifest is rebuilt its chunks are known: download (new chunks only do work), dedup and shard, for the
    dataset that run built (its materialization names the dataset and its partitions)."""
    (entry,) = context.instance.all_logs(context.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    metadata = entry.asset_materialization.metadata
    first, last = metadata["partition_range"].value.split("...")
    return dg.RunRequest(
        run_key=context.dagster_run.run_id,
        run_config={"resources": {"layout": {"config": {"dataset": metadata["dataset"].value}}}},
        tags=partition_range_tags(first, last),
    )
