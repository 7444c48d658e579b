import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import webdataset
import wids
from PIL import Image

from beni_pipeline.cli import materialize_all
from beni_pipeline.definitions import defs as definitions
from beni_pipeline.defs.data.assets import downloaded, manifest_chunks, source_manifest
from beni_pipeline.defs.data.checks import every_row_has_one_status
from tests.pipeline.conftest import materialize, run_check

REPO = Path(__file__).parents[2]


def write_source(path: Path, base_url: str, local: Path) -> Path:
    rows = [{"url": f"{base_url}/img/{i}.jpg", "caption": f"picture number {i}"} for i in range(24)]
    rows += [{"url": f"{base_url}/gone/{i}.jpg", "caption": f"gone {i}"} for i in range(3)]
    rows += [{"url": str(local), "caption": "a local file"}, {"url": "", "caption": "no url"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def latest_metadata(instance, key: str, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_materialize_manifest_then_every_partition(instance, fault_server, tmp_path):
    from tests.conftest import jpeg_bytes

    local = tmp_path / "local.jpg"
    local.write_bytes(jpeg_bytes(200, 100))
    source = write_source(tmp_path / "rows.jsonl", fault_server.url, local)
    config = {
        "source_manifest": {"sources": [str(source)], "chunk_size": 10},
        "downloaded": {"workers": 2, "retries": 0, "allow_private_networks": True},  # the test server is on 127.0.0.1
    }
    results = materialize_all(instance, config, dg.AssetSelection.assets(source_manifest, downloaded))
    checks = {e.check_name: e.passed for r in results for e in r.get_asset_check_evaluations()}
    assert checks == {"every_row_has_one_status": True, "failed_download_rate": True}

    assert instance.get_dynamic_partitions(manifest_chunks.name) == ["demo/00000", "demo/00001", "demo/00002"]
    manifest = latest_metadata(instance, "source_manifest")
    assert manifest["rows"] == 28 and manifest["rejected"] == 1
    for key in ["demo/00000", "demo/00001", "demo/00002"]:
        meta = latest_metadata(instance, "downloaded", key)
        assert meta["rows"] == 28 and meta["ok"] == 25 and meta["failed"] == 3
        assert "data:image/jpeg;base64" in meta["preview"]

    hits = sum(len(v) for v in fault_server.hits.values())
    result = materialize([source_manifest, downloaded], instance=instance, selection=[downloaded], partition_key="demo/00001")
    assert result.success
    assert latest_metadata(instance, "downloaded", "demo/00001")["fetched_this_run"] == 0
    assert sum(len(v) for v in fault_server.hits.values()) == hits

    index_path = tmp_path / "data" / "datasets" / "demo" / "downloaded" / "00002" / "index.parquet"
    pq.write_table(pq.read_table(index_path).slice(1), index_path)  # a status row goes missing
    evaluation = run_check(downloaded, every_row_has_one_status, instance)
    assert not evaluation.passed and "chunk 00002: 8 rows, 7 with a status" in evaluation.metadata["problems"].value


def test_bad_source_fails_with_one_sentence(instance, tmp_path):
    result = materialize(
        [source_manifest],
        instance=instance,
        run_config={"ops": {"source_manifest": {"config": {"sources": [str(tmp_path / "missing.csv")]}}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    error = failure.step_failure_data.error
    assert error.cls_name == "Failure" and error.cause is None
    assert error.message.strip().endswith("missing.csv does not exist; check the path in the `sources` config")


def test_cli_materializes_manifest_and_a_partition(instance, fault_server, tmp_path):
    local = tmp_path / "local.jpg"
    from tests.conftest import jpeg_bytes

    local.write_bytes(jpeg_bytes(200, 100))
    source = write_source(tmp_path / "rows.jsonl", fault_server.url, local)
    env = dict(os.environ)
    base = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "beni_pipeline.definitions"]
    manifest_config = {"ops": {"source_manifest": {"config": {"sources": [str(source)], "chunk_size": 20}}}}
    subprocess.run(base + ["--select", "source_manifest", "--config-json", json.dumps(manifest_config)], check=True, env=env, cwd=REPO)
    download_config = {"ops": {"downloaded": {"config": {"allow_private_networks": True}}}}
    download = ["--select", "downloaded", "--partition", "demo/00001", "--config-json", json.dumps(download_config)]
    subprocess.run(base + download, check=True, env=env, cwd=REPO)
    meta = latest_metadata(instance, "downloaded", "demo/00001")
    assert meta["rows"] == 8 and meta["ok"] == 5


def test_default_corpus_to_shards(instance, tmp_path):
    """The whole data group on the generated corpus: planted duplicates found, shards readable, checks green."""
    results = materialize_all(instance, {"source_manifest": {"corpus_samples": 600, "chunk_size": 250}}, dg.AssetSelection.groups("data"))
    checks = {e.check_name: e.passed for r in results for e in r.get_asset_check_evaluations()}
    assert checks == dict.fromkeys(
        ["every_row_has_one_status", "failed_download_rate", "duplicate_rate", "counts_conserve", "shards_match_checksums"], True
    )
    data = tmp_path / "data" / "datasets" / "demo"
    manifest = pq.read_table(data / "manifest" / "manifest.parquet").to_pylist()
    id_of = {row["url"]: row["sample_id"] for row in manifest}
    planted = [json.loads(line) for line in (data / "corpus" / "planted_duplicates.jsonl").read_text().splitlines()]
    corpus = data / "corpus"
    groups = {}
    for p in planted:  # an original and all its planted copies are duplicates of each other
        groups.setdefault(p["duplicate_of"], {p["duplicate_of"]}).add(p["url"])
    true_pairs = {
        frozenset(pair)
        for g in groups.values()
        for pair in itertools.combinations(sorted(id_of[str((corpus / u).resolve())] for u in g), 2)
    }
    clusters = pq.read_table(data / "dedup" / "clusters.parquet").to_pylist()
    found_pairs = {frozenset(pair) for c in clusters for pair in itertools.combinations([c["kept_id"], *c["dropped_ids"]], 2)}
    precision = len(found_pairs & true_pairs) / len(found_pairs)
    recall = len(found_pairs & true_pairs) / len(true_pairs)
    assert len(planted) == 30 and precision >= 0.99 and recall >= 0.95, (precision, recall)

    kept = set(pq.read_table(data / "dedup" / "kept.parquet").column("sample_id").to_pylist())
    shards = sorted(str(p) for p in (data / "shards").glob("train-*.tar"))
    keys = [sample["__key__"] for sample in webdataset.WebDataset(shards, shardshuffle=False).decode("pil")]
    dropped = pq.read_metadata(data / "dedup" / "duplicates.parquet").num_rows
    assert sorted(keys) == sorted(kept) and len(kept) == 600 - dropped
    lengths = [
        json.loads(s[".json"].read())["length"] for s in wids.ShardListDataset(str(data / "shards" / "index.json"), transformations=[])
    ]
    assert lengths == sorted(lengths)

    before = {p.name: p.read_bytes() for p in (data / "shards").glob("train-*.tar")}
    materialize_all(instance, {"source_manifest": {"corpus_samples": 600, "chunk_size": 250}}, dg.AssetSelection.groups("data"))
    assert {p.name: p.read_bytes() for p in (data / "shards").glob("train-*.tar")} == before
    assert latest_metadata(instance, "deduplicated")["chunks_hashed_this_run"] == 0


def test_rebuild_schedule_and_sensor(instance, tmp_path):
    defs = definitions()
    schedule = defs.resolve_schedule_def("dataset_rebuild")
    (request,) = schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
    assert schedule.job_name == "dataset_source"
    assert defs.resolve_job_def("dataset_source").asset_layer.executable_asset_keys == {dg.AssetKey("source_manifest")}

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"url": f"{i}.jpg", "caption": f"c{i}"}) + "\n" for i in range(25)))
    config = {"ops": {"source_manifest": {"config": {"sources": [str(source)], "chunk_size": 10}}}}
    result = defs.resolve_job_def("dataset_source").execute_in_process(run_config=config, instance=instance)
    success = [e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_SUCCESS][0]
    sensor = defs.resolve_sensor_def("build_dataset_after_manifest")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=success, dagster_instance=instance, dagster_run=result.dagster_run
    )
    build = sensor(context)
    assert (
        build.tags["dagster/asset_partition_range_start"] == "demo/00000"
        and build.tags["dagster/asset_partition_range_end"] == "demo/00002"
    )
    assert build.run_config == {"resources": {"layout": {"config": {"dataset": "demo"}}}}
    assert sensor.job_name == "dataset_build"


DATA_CHECKS = ["every_row_has_one_status", "failed_download_rate", "duplicate_rate", "counts_conserve", "shards_match_checksums"]


def distinct_images(folder: Path, n: int) -> Path:
    """A folder of n noise images, each with its own caption: nothing in it is a duplicate of anything."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"noise picture {i} in shade {rng.integers(1000)}")
    return folder


def test_a_clean_dataset_runs_to_shards_with_nothing_failed_or_dropped(instance, tmp_path):
    source = distinct_images(tmp_path / "images", 30)
    results = materialize_all(instance, {"source_manifest": {"sources": [str(source)], "chunk_size": 10}}, dg.AssetSelection.groups("data"))
    assert {e.check_name: e.passed for r in results for e in r.get_asset_check_evaluations()} == dict.fromkeys(DATA_CHECKS, True)
    assert latest_metadata(instance, "source_manifest")["rejected"] == 0
    downloaded_meta = latest_metadata(instance, "downloaded", "demo/00002")
    assert (downloaded_meta["rows"], downloaded_meta["ok"], downloaded_meta["failed"]) == (30, 30, 0)
    dedup = latest_metadata(instance, "deduplicated")
    assert (dedup["rows"], dedup["kept"], dedup["dropped"], dedup["clusters"]) == (30, 30, 0, 0)
    assert dedup["phash_key_bands"] == 2  # chosen by the corpus's size
    assert dedup["clusters_preview"] == "no duplicates"
    assert latest_metadata(instance, "training_shards")["samples"] == 30


def test_when_every_download_fails_the_check_fails_and_sharding_says_why(instance, fault_server, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"url": f"{fault_server.url}/gone/{i}.jpg", "caption": f"gone {i}"}) + "\n" for i in range(30)))
    config = {"source_manifest": {"sources": [str(source)], "chunk_size": 10}, "downloaded": {"retries": 0}}
    results = materialize_all(instance, config, dg.AssetSelection.assets("source_manifest", "downloaded", "deduplicated"))
    evaluations = {e.check_name: e for r in results for e in r.get_asset_check_evaluations()}
    assert {name: e.passed for name, e in evaluations.items()} == {"every_row_has_one_status": True, "failed_download_rate": False}
    assert evaluations["failed_download_rate"].severity == dg.AssetCheckSeverity.ERROR
    assert not results[-1].success  # the blocking check stopped the run before dedup
    assert instance.get_latest_materialization_event(dg.AssetKey("deduplicated")) is None
    assert latest_metadata(instance, "downloaded", "demo/00000")["failed"] == 30

    assert materialize(list(definitions().assets), instance=instance, selection=dg.AssetSelection.assets("deduplicated")).success
    dedup = latest_metadata(instance, "deduplicated")
    assert (dedup["rows"], dedup["kept"], dedup["clusters"], dedup["clusters_preview"]) == (0, 0, 0, "no duplicates")

    result = materialize(
        list(definitions().assets), instance=instance, selection=dg.AssetSelection.assets("training_shards"), raise_on_error=False
    )
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    assert error.cls_name == "Failure" and error.cause is None
    assert "No sample to shard: none of the 30 manifest rows downloaded (failures: " in error.message
    assert error.message.strip().endswith("re-materialize downloaded.")


def test_a_source_with_no_usable_row_fails_the_manifest_with_one_sentence(instance, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"url": f"{i}.jpg", "caption": " "}) + "\n" for i in range(30)))
    result = materialize(
        [source_manifest],
        instance=instance,
        run_config={"ops": {"source_manifest": {"config": {"sources": [str(source)]}}}},
        raise_on_error=False,
    )
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    assert error.cls_name == "Failure" and error.cause is None
    assert "none of the 30 rows of the sources is usable (missing_text 30)" in error.message
    assert instance.get_dynamic_partitions(manifest_chunks.name) == []
