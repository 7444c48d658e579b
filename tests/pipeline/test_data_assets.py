import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from beni_pipeline.cli import materialize_all
from beni_pipeline.defs.data.assets import downloaded, manifest_chunks, source_manifest

REPO = Path(__file__).parents[2]


@pytest.fixture
def instance(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("BENI_DATA", str(tmp_path / "data"))
    with dg.DagsterInstance.get() as instance:
        yield instance


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
        "downloaded": {"workers": 2, "retries": 0},
    }
    materialize_all(instance, config)

    assert instance.get_dynamic_partitions(manifest_chunks.name) == ["00000", "00001", "00002"]
    manifest = latest_metadata(instance, "source_manifest")
    assert manifest["rows"] == 28 and manifest["rejected"] == 1
    for key in ["00000", "00001", "00002"]:
        meta = latest_metadata(instance, "downloaded", key)
        assert meta["rows"] == 28 and meta["ok"] == 25 and meta["failed"] == 3
        assert "data:image/jpeg;base64" in meta["preview"]

    hits = sum(len(v) for v in fault_server.hits.values())
    result = dg.materialize([source_manifest, downloaded], instance=instance, selection=[downloaded], partition_key="00001")
    assert result.success
    assert latest_metadata(instance, "downloaded", "00001")["fetched_this_run"] == 0
    assert sum(len(v) for v in fault_server.hits.values()) == hits


def test_bad_source_fails_with_one_sentence(instance, tmp_path):
    result = dg.materialize(
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
    subprocess.run(base + ["--select", "downloaded", "--partition", "00001"], check=True, env=env, cwd=REPO)
    meta = latest_metadata(instance, "downloaded", "00001")
    assert meta["rows"] == 8 and meta["ok"] == 5
