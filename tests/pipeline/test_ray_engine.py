"""The data graph on a real Ray cluster (a head and two worker nodes on this machine), against the local engine."""

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from beni_pipeline.cli import materialize_all
from beni_pipeline.defs.data.assets import downloaded, source_manifest
from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.prep.locks import exclusive
from tests.pipeline.conftest import REPO, materialize


@pytest.fixture
def ray_cluster(monkeypatch):
    # Ray's switch for clusters of one machine: every node binds 127.0.0.1, so nothing leaves the loopback (read at import)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    # A live raylet that a busy 2-core machine keeps from answering Ray's 10 s health check five times is declared dead,
    # and so is the driver on it; a killed one refuses the check at once, so it is still found dead in ~15 s.
    system = {"health_check_timeout_ms": 60_000}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


def picture(rng: np.random.Generator) -> bytes:
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(blocks).resize((int(rng.integers(160, 400)), 120), Image.Resampling.NEAREST).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_source(path: Path, server) -> Path:
    """48 distinct images and captions, 4 byte-identical copies of some of them with the same caption, 3 that are gone."""
    rng = np.random.default_rng(0)
    words = [f"word{i}" for i in range(500)]
    rows = []
    for i in range(48):
        server.images[f"/row/{i}.jpg"] = picture(rng)
        rows.append({"url": f"{server.url}/row/{i}.jpg", "caption": " ".join(rng.choice(words, 8))})
    for i in (3, 17, 30, 41):
        server.images[f"/copy/{i}.jpg"] = server.images[f"/row/{i}.jpg"]
        rows.append({"url": f"{server.url}/copy/{i}.jpg", "caption": rows[i]["caption"]})
    rows += [{"url": f"{server.url}/gone/{i}.jpg", "caption": f"gone {i}"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def outputs(data: Path) -> dict[str, bytes]:
    """Every file the data graph publishes, by path under the dataset's folder (staging tars aside: their names are per run)."""
    files = [data / "manifest" / "manifest.parquet", *sorted((data / "dedup").glob("*.parquet")), *sorted((data / "shards").glob("*"))]
    return {str(p.relative_to(data)): p.read_bytes() for p in files if p.is_file()}


def statuses(data: Path) -> list[dict]:
    rows = [r for index in sorted((data / "downloaded").glob("*/index.parquet")) for r in pq.read_table(index).to_pylist()]
    return sorted(({k: v for k, v in r.items() if k not in ("tar", "offset")} for r in rows), key=lambda r: r["sample_id"])


def ray_errors(cluster) -> str:
    """The ERROR and FATAL lines of the cluster's Ray logs: what a driver that died without a word of its own died of."""
    logs = Path(cluster.head_node.get_session_dir_path()) / "logs"
    lines = [f"{f.name}: {line}" for f in sorted(logs.glob("*.*")) if f.is_file() for line in f.read_text(errors="replace").splitlines()]
    return "\n".join(line for line in lines if re.search(r"\[[-\d: ,]+ [EF] \d+ \d+\]", line))[-6000:]


def test_the_data_graph_on_ray_equals_the_local_run_with_a_worker_node_killed_mid_download(
    instance, fault_server, ray_cluster, tmp_path, monkeypatch
):
    cluster, workers = ray_cluster
    source = write_source(tmp_path / "rows.jsonl", fault_server)
    config = {
        "source_manifest": {"chunk_size": 8},
        # one request at a time and small parts: a chunk takes seconds and commits as it goes, so the kill lands mid-chunk
        "downloaded": {"workers": 1, "concurrency": 1, "retries": 0, "part_size": 2, "allow_private_networks": True},
    }
    monkeypatch.setenv("BENI_DATASET", "rows")  # the dataset `beni build --source rows.jsonl` names
    monkeypatch.setenv("BENI_DATA", str(tmp_path / "local"))
    local_config = {**config, "source_manifest": {**config["source_manifest"], "sources": [str(source)]}}
    results = materialize_all(instance, local_config, dg.AssetSelection.groups("data"), "rows")
    assert all(r.success for r in results)

    # the same graph as a user runs it from a shell, `beni build` on the cluster: its own process is Ray's driver
    ray_data = tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENI_DATA": str(ray_data), "BENI_ENGINE": "ray", "BENI_RAY_ADDRESS": cluster.address}
    fault_server.delay = 0.2
    killed = {}

    def kill_a_worker_node_once_a_part_is_committed():
        deadline = time.monotonic() + 120
        while not list(DataLayout(root=str(ray_data)).base.glob("downloaded/*/*-*-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed["chunks_complete"] = len(list(DataLayout(root=str(ray_data)).base.glob("downloaded/*/index.parquet")))
        cluster.remove_node(workers[0], allow_graceful=False)
        killed["at"] = time.monotonic()

    killer = threading.Thread(target=kill_a_worker_node_once_a_part_is_committed)
    killer.start()
    build = [sys.executable, "-m", "beni_pipeline.cli", "build", "--source", str(source), "--config", json.dumps(config)]
    done = subprocess.run(build, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    killer.join()
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{ray_errors(cluster)}"
    assert killed["chunks_complete"] < 7, killed  # the node died while chunks were still downloading
    verdicts = re.findall(r"check (\w+): (\w+)", done.stdout)
    assert len(verdicts) >= 5 and all(verdict == "passed" for _, verdict in verdicts), done.stdout

    local_base, ray_base = DataLayout(root=str(tmp_path / "local")).base, DataLayout(root=str(ray_data)).base
    local, remote = outputs(local_base), outputs(ray_base)
    assert sorted(remote) == sorted(local) and any(name.endswith(".tar") for name in local)
    assert [name for name in local if local[name] != remote[name]] == []
    manifest_ids = sorted(pq.read_table(ray_base / "manifest" / "manifest.parquet").column("sample_id").to_pylist())
    assert [r["sample_id"] for r in statuses(ray_base)] == manifest_ids  # every row once: none lost, none twice
    assert statuses(ray_base) == statuses(local_base)
    assert pq.read_table(ray_base / "dedup" / "duplicates.parquet").num_rows == 4
    dedup = instance.get_latest_materialization_event(dg.AssetKey("deduplicated")).asset_materialization
    peaks = dedup.metadata["clustering_peak_rss_mib"].value
    assert len(peaks) >= 2 and all(mib > 0 for mib in peaks.values()), peaks  # this process and the workers that ran its jobs

    # a chunk another process holds (this test's process is Ray's driver now): the task on the cluster waits, then the run
    # fails with the one-machine sentence
    monkeypatch.setenv("BENI_DATA", str(ray_data))
    monkeypatch.setenv("BENI_ENGINE", "ray")
    monkeypatch.setenv("BENI_RAY_ADDRESS", cluster.address)
    with exclusive(ray_base / "downloaded" / "00003" / ".lock", 0, "unused"):
        result = materialize(
            [source_manifest, downloaded],
            instance=instance,
            selection=[downloaded],
            partition_key="rows/00003",
            run_config={"ops": {"downloaded": {"config": {**config["downloaded"], "lock_wait_s": 1}}}},
            raise_on_error=False,
        )
    error = result.get_step_failure_events()[0].step_failure_data.error
    assert error.cls_name == "Failure" and error.cause is None
    assert f"chunk 00003 is being downloaded by another run (pid {os.getpid()})" in error.message
