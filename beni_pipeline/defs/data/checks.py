import tarfile
from collections import Counter

import dagster as dg
import pyarrow.parquet as pq
import pydantic

from beni_pipeline.defs.config import Config
from beni_pipeline.defs.data.assets import deduplicated, downloaded, training_shards
from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.prep.shard import read_index as read_shard_index
from beni_pipeline.prep.shard import verify_shards


class CeilingConfig(Config):
    ceiling: float = pydantic.Field(0.2, ge=0, le=1, description="warn above this fraction")


@dg.asset_check(asset=downloaded, description="Every manifest row of every downloaded chunk has exactly one status row.")
def every_row_has_one_status(layout: DataLayout) -> dg.AssetCheckResult:
    checked, problems = 0, []
    for chunk in sorted(layout.manifest_chunks.glob("*.parquet")):
        index_path = layout.download_index(chunk.stem)
        if not index_path.exists():
            continue
        expected = pq.read_table(chunk, columns=["sample_id"]).column("sample_id").to_pylist()
        got = pq.read_table(index_path, columns=["sample_id"]).column("sample_id").to_pylist()
        checked += 1
        if len(got) != len(set(got)) or set(got) != set(expected):
            problems.append(
                f"chunk {chunk.stem}: {len(expected)} rows, {len(set(got) & set(expected))} with a status, {len(got) - len(set(got))} repeated"
            )
    return dg.AssetCheckResult(
        passed=not problems, metadata={"chunks_checked": checked, "problems": dg.MetadataValue.md("\n".join(problems) or "none")}
    )


@dg.asset_check(
    asset=downloaded,
    blocking=True,
    description="The share of rows that failed to download stays under a ceiling (a warning); when no row downloaded at all it is an "
    "error that stops the run before dedup and shards.",
)
def failed_download_rate(config: CeilingConfig, layout: DataLayout) -> dg.AssetCheckResult:
    counts = Counter()
    for index_path in layout.download_indexes():
        counts.update(pq.read_table(index_path, columns=["status"]).column("status").to_pylist())
    total = sum(counts.values())
    rate = counts["failed"] / total if total else 0.0
    return dg.AssetCheckResult(
        passed=rate <= config.ceiling,
        severity=dg.AssetCheckSeverity.ERROR if total and rate == 1 else dg.AssetCheckSeverity.WARN,
        metadata={"failed_rate": round(rate, 4), "failed": counts["failed"], "rows": total, "ceiling": config.ceiling},
    )


@dg.asset_check(asset=deduplicated, description="The share of downloaded samples dropped as duplicates stays under a ceiling.")
def duplicate_rate(config: CeilingConfig, layout: DataLayout) -> dg.AssetCheckResult:
    dropped = pq.read_metadata(layout.duplicates).num_rows
    kept = pq.read_metadata(layout.kept).num_rows
    rate = dropped / max(1, dropped + kept)
    return dg.AssetCheckResult(
        passed=rate <= config.ceiling,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"duplicate_rate": round(rate, 4), "dropped": dropped, "rows": dropped + kept, "ceiling": config.ceiling},
    )


@dg.asset_check(
    asset=training_shards,
    description="Counts add up from manifest to shards: each row downloaded or failed, each download kept or a duplicate, "
    "each kept sample in exactly one shard under one key.",
)
def counts_conserve(layout: DataLayout) -> dg.AssetCheckResult:
    manifest = set(pq.read_table(layout.manifest_parquet, columns=["sample_id"]).column("sample_id").to_pylist())
    status = {}
    for index_path in layout.download_indexes():
        status.update(zip(*pq.read_table(index_path, columns=["sample_id", "status"]).to_pydict().values()))
    ok = {s for s, v in status.items() if v == "ok" and s in manifest}
    kept = set(pq.read_table(layout.kept).column("sample_id").to_pylist())
    dropped = set(pq.read_table(layout.duplicates, columns=["sample_id"]).column("sample_id").to_pylist())
    keys = Counter()
    for entry in read_shard_index(layout.shards)["shardlist"]:
        with tarfile.open(layout.shards / entry["url"]) as tar:
            keys.update({name.split(".", 1)[0] for name in tar.getnames()})
    problems = {
        "manifest rows without a download status": len(manifest - status.keys()),
        "downloads neither kept nor dropped": len(ok - kept - dropped),
        "samples both kept and dropped": len(kept & dropped),
        "kept samples missing from the shards": len(kept - keys.keys()),
        "shard keys that were not kept": len(keys.keys() - kept),
        "keys in more than one shard": sum(n > 1 for n in keys.values()),
    }
    return dg.AssetCheckResult(
        passed=not any(problems.values()),
        metadata={"manifest": len(manifest), "ok": len(ok), "kept": len(kept), "dropped": len(dropped), "in_shards": len(keys), **problems},
    )


@dg.asset_check(asset=training_shards, description="Every shard exists with the size and sha256 its index records.")
def shards_match_checksums(layout: DataLayout) -> dg.AssetCheckResult:
    bad = verify_shards(layout.shards)
    return dg.AssetCheckResult(passed=not bad, metadata={"mismatched": dg.MetadataValue.json(bad)})
