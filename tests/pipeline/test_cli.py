"""`beni build` as a user runs it: a real subprocess on a parquet of URLs served by a real local HTTP server."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).parents[2]
# the test server listens on 127.0.0.1, which downloads refuse unless told
ALLOW_LOOPBACK = json.dumps({"downloaded": {"allow_private_networks": True, "retries": 0}})


def beni(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "beni_pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def noise_png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def write_rows(path: Path, urls: list[str]) -> Path:
    rows = [{"image_url": url, "text": f"noise picture {i}, shade {i * 37 % 1000}"} for i, url in enumerate(urls)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_build_runs_a_clean_source_to_shards_in_its_own_dataset(instance, fault_server, tmp_path):
    for i in range(30):
        fault_server.images[f"/noise/{i}.png"] = noise_png(i)
    write_rows(tmp_path / "rows.parquet", [f"{fault_server.url}/noise/{i}.png" for i in range(30)])
    args = ["build", "--source", "rows.parquet", "--url-column", "image_url", "--caption-column", "text", "--config", ALLOW_LOOPBACK]

    done = beni(*args, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "downloaded: partitions=1, rows=30, ok=30, failed=0" in done.stdout
    assert "deduplicated: rows=30, kept=30, dropped=0" in done.stdout
    assert "training_shards: samples=30, shards=1" in done.stdout
    for check in ["every_row_has_one_status", "failed_download_rate", "duplicate_rate", "counts_conserve", "shards_match_checksums"]:
        assert f"check {check}: passed" in done.stdout
    dataset = tmp_path / "data" / "datasets" / "rows"
    assert (dataset / "shards" / "index.json").is_file() and not (tmp_path / "data" / "datasets" / "demo").exists()
    assert instance.get_dynamic_partitions("manifest_chunks") == ["rows/00000"]
    assert {run.job_name for run in instance.get_runs()} == {"dataset_source", "dataset_build"}
    assert beni("partitions", "--dataset", "rows", cwd=tmp_path).stdout == "rows/00000...rows/00000\n"

    # the same rows again: nothing fetched, same shards; other rows into the same dataset are refused, with the fix
    again = beni(*args, cwd=tmp_path)
    assert again.returncode == 0 and "fetched_this_run=0" in again.stdout
    write_rows(tmp_path / "other.parquet", [f"{fault_server.url}/noise/{i}.png" for i in range(3)])
    other = beni(
        "build", "--source", "other.parquet", "--dataset", "rows", "--url-column", "image_url", "--caption-column", "text", cwd=tmp_path
    )
    assert other.returncode == 1
    assert "Dataset 'rows' was built from " in other.stdout and "name another dataset for them" in other.stdout


def test_build_fails_and_names_the_check_when_every_download_fails(instance, fault_server, tmp_path):
    write_rows(tmp_path / "gone.parquet", [f"{fault_server.url}/gone/{i}.png" for i in range(30)])

    done = beni(
        "build",
        "--source",
        "gone.parquet",
        "--url-column",
        "image_url",
        "--caption-column",
        "text",
        "--config",
        ALLOW_LOOPBACK,
        cwd=tmp_path,
    )

    assert done.returncode == 1
    assert "downloaded: partitions=1, rows=30, ok=0, failed=30" in done.stdout
    assert "check failed_download_rate: FAILED (ERROR: failed_rate=1.0, failed=30, rows=30" in done.stdout
    assert "beni build: check failed_download_rate of downloaded failed" in done.stderr
    assert "deduplicated:" not in done.stdout  # the failed check stops the build before dedup and shards
    assert sum(len(hits) for path, hits in fault_server.hits.items() if path.startswith("/gone/")) == 30


def test_materializing_a_partition_before_its_manifest_names_the_fix(instance, tmp_path):
    from beni_pipeline.definitions import defs

    instance.add_dynamic_partitions("manifest_chunks", ["demo/00000"])  # registered, but the data root holds no manifest
    result = (
        defs()
        .resolve_job_def("dataset_build")
        .execute_in_process(
            instance=instance, partition_key="demo/00000", asset_selection=[dg.AssetKey("downloaded")], raise_on_error=False
        )
    )
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    assert error.cls_name == "Failure" and error.cause is None
    assert "Failure: Partition demo/00000 has no manifest chunk at " in error.message
    assert error.message.strip().endswith(
        "materialize source_manifest for dataset demo first (with the same BENI_DATA); partitions look like demo/00000."
    )


def test_partitions_says_to_materialize_the_manifest_first(instance, tmp_path):
    done = beni("partitions", "--dataset", "mine", cwd=tmp_path)
    assert done.returncode == 1 and done.stderr == "Dataset 'mine' has no chunks yet: materialize source_manifest first.\n"


def test_every_asset_runs_in_exactly_one_named_job_and_descriptions_show_as_written():
    from beni_pipeline.cli import JOBS
    from beni_pipeline.definitions import defs

    definitions = defs()
    graph = definitions.resolve_asset_graph()
    in_jobs = [key for name in JOBS for key in definitions.resolve_job_def(name).asset_layer.executable_asset_keys]
    assert sorted(in_jobs) == sorted(graph.get_all_asset_keys())  # beni demo runs named jobs, and each asset once
    descriptions = [graph.get(key).description for key in graph.get_all_asset_keys()]
    descriptions += [definitions.resolve_job_def(name).description for name in JOBS]
    descriptions += [spec.description for checks in definitions.asset_checks for spec in checks.check_specs]
    # the UI renders descriptions as markdown with HTML: a <word> would vanish as an unknown tag
    assert not [d for d in descriptions if d and re.search(r"<[A-Za-z/]", d)]


def test_first_hour_mistakes_get_one_sentence_each(instance, tmp_path):
    missing = beni("build", "--source", "nowhere.parquet", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.endswith("error: source nowhere.parquet does not exist; check the path\n")

    write_rows(tmp_path / "rows.parquet", ["a.png"])  # columns image_url and text, and no --url-column
    columns = beni("build", "--source", "rows.parquet", cwd=tmp_path)
    assert columns.returncode == 1
    assert "has no column 'url' (it has: image_url, text); set url_column to the image column" in columns.stdout
    assert "beni build: run dataset_source failed" in columns.stderr
