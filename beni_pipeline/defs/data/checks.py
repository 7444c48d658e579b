import tarfile
from collections import Counter

import dagster as dg
import pyarrow.parquet as pq
import pydantic

from beni_pipeline.defs.config import Config
from beni_pipeline.defs.data.assets import deduplicated, downloaded, training_shards
from beni_pipeline.paths import data_root
from beni_pipeline.prep.shard import read_index as read_shard_index
from beni_pipeline.prep.shard import verify_shards


class CeilingConfig(Config):
    ceiling: float = pydantic.Field(0.2, ge=0, le=1, description="warn above this fraction")


@dg.asset_check(asset=downloaded, description="Every manifest row of every downloaded chunk has exactly one status row.")
def every_row_has_one_status() -> dg.AssetCheckResult:
    root = data_root()
    checked, problems = 0, []
    for chunk in sorted((root / "manifest" / "chunks").glob("*.parquet")):
        index_path = root / "downloaded" / chunk.stem / "index.parquet"
        if not index_path.exists():
            continue
        expected = pq.read_table(chunk, columns=["sample_id"]).column("sample_id").to_pylist()
        got = pq.read_table(index_path, columns=["sample_id"]).column("sample_id").to_pylist()
        checked += 1
        if len(got) != len(set(got)) or set(got) != set(expected):
            problems.append(f"chunk {chunk.stem}: {len(expected)} rows, {len(set(got) & set(expected))} with a status, {len(got) - len(set(got))} repeated")
    return dg.AssetCheckResult(
        passed=not problems, metadata={"chunks_checked": checked, "problems": dg.MetadataValue.md("\n".join(problems) or "none")}
    )


@dg.asset_check(asset=downloaded, description="The share of rows that failed to download stays under a ceiling.")
def failed_download_rate(config: CeilingConfig) -> dg.AssetCheckResult:
    counts = Counter()
    for index_path in (data_root() / "downloaded").glob("*/index.parquet"):
        counts.update(pq.read_table(index_path, columns=["status"]).column("status").to_pylist())
    total = sum(counts.values())
    rate = counts["failed"] / total if total else 0.0
    return dg.AssetCheckResult(
        passed=rate <= config.ceiling,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"failed_rate": round(rate, 4), "failed": counts["failed"], "rows": total, "ceiling": config.ceiling},
    )


@dg.asset_check(asset=deduplicated, description="The share of downloaded samples dropped as duplicates stays under a ceiling.")
def duplicate_rate(config: CeilingConfig) -> dg.AssetCheckResult:
    root = data_root() / "dedup"
    dropped = pq.read_metadata(root / "duplicates.parquet").num_rows
    kept = pq.read_metadata(root / "kept.parquet").num_rows
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
def counts_conserve() -> dg.AssetCheckResult:
    root = data_root()
    manifest = set(pq.read_table(root / "manifest" / "manifest.parquet", columns=["sample_id"]).column("sample_id").to_pylist())
    status = {}
    for index_path in (root / "downloaded").glob("*/index.parquet"):
        status.update(zip(*pq.read_table(index_path, columns=["sample_id", "status"]).to_pydict().values()))
    ok = {s for s, v in status.items() if v == "ok" and s in manifest}
    kept = set(pq.read_table(root / "dedup" / "kept.parquet").column("sample_id").to_pylist())
    dropped = set(pq.read_table(root / "dedup" / "duplicates.parquet", columns=["sample_id"]).column("sample_id").to_pylist())
    keys = Counter()
    for entry in read_shard_index(root / "shards")["shardlist"]:
        with tarfile.open(root / "shards" / entry["url"]) as tar:
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
def shards_match_checksums() -> dg.AssetCheckResult:
    bad = verify_shards(data_root() / "shards")
    return dg.AssetCheckResult(passed=not bad, metadata={"mismatched": dg.MetadataValue.json(bad)})
