"""Dedup at scale: signatures + clustering of generated captions (and their images' hashes), the local engine against
Ray with two one-CPU worker nodes on the same machine, through the functions the `deduplicated` asset calls.

    .venv/bin/python bench/scale.py [--rows 100000 1000000] [--engines local ray]

Each size: chunks of generated captions with planted near-copies (a word or more replaced, the image's dHash one bit
off, a quarter byte-identical), then per engine
  local: signatures per chunk in 2 processes, then `find_duplicates` (the clustering's jobs, one after another) in this process;
  ray:   signatures per chunk as tasks, then `find_duplicates_parallel`'s jobs (keys per chunk, candidate pairs per bucket,
         candidate rows' features per chunk, confirmation per group of pairs) as tasks.
Reported: wall time, CPU seconds of every process, captions per CPU-second, peak RSS of each process (this one and each
worker), and precision / recall of the planted pairs by true Jaccard band. Both engines must find the same clusters.
"""

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beni_pipeline.prep.cluster import ray_map
from beni_pipeline.prep.dedup import (
    THUMB,
    DedupResult,
    DedupSettings,
    find_duplicates,
    find_duplicates_parallel,
    minhash_signatures,
    peak_rss_mib,
    shingles,
    write_features,
)

CHUNK_ROWS = 50_000  # a manifest chunk's rows: the unit of the per-chunk jobs
BANDS = [(0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]


def generate(out: Path, rows: int, seed: int = 0, copy_rate: float = 0.05) -> tuple[list[Path], list[tuple[str, str, float]]]:
    """Chunks of (sample_id, text, content_sha256, phash, thumb); returns them and the planted pairs with their true Jaccard."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20000)])
    lengths = rng.integers(6, 21, rows)
    words = np.minimum(rng.zipf(1.2, size=int(lengths.sum())), len(vocab)) - 1
    starts = np.r_[0, np.cumsum(lengths)]
    texts = [" ".join(vocab[words[starts[i] : starts[i + 1]]]) for i in range(rows)]
    phash = rng.integers(0, 2**63, rows, dtype=np.uint64)
    thumbs = rng.integers(0, 256, (rows, THUMB * THUMB), dtype=np.uint8)
    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)]
    picked = rng.permutation(rows)[: 2 * int(rows * copy_rate)]
    sources, copies = picked[::2], picked[1::2]  # disjoint: no copy of a copy
    planted = []
    for s, c in zip(sources.tolist(), copies.tolist()):
        text = texts[s].split()
        for j, k in enumerate(rng.choice(len(text), int(rng.integers(0, 4)), replace=False).tolist()):
            text[k] = f"x{c}y{j}"  # a word no other caption has
        texts[c], phash[c], thumbs[c] = " ".join(text), phash[s] ^ np.uint64(1 << int(rng.integers(64))), thumbs[s]
        if c % 4 == 0:
            sha[c] = sha[s]
        a, b = set(shingles(texts[s], 1)), set(shingles(texts[c], 1))
        planted.append((f"{s:016x}", f"{c:016x}", len(a & b) / len(a | b)))
    paths = []
    for i, start in enumerate(range(0, rows, CHUNK_ROWS)):
        part = np.arange(start, min(rows, start + CHUNK_ROWS))
        table = pa.table(
            {
                "sample_id": [f"{j:016x}" for j in part],
                "text": [texts[j] for j in part],
                "content_sha256": [sha[j] for j in part],
                "phash": pa.array(phash[part], pa.uint64()),
                "thumb": pa.array([thumbs[j].tobytes() for j in part], pa.binary(THUMB * THUMB)),
            }
        )
        paths.append(out / "raw" / f"{i:05d}.parquet")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, paths[-1])
    return paths, planted


def sign_chunk(raw: Path, out: Path, settings: DedupSettings) -> Path:
    """A chunk's features as `write_chunk_features` lays them out, from generated text instead of decoded images."""
    table = pq.read_table(raw)
    signatures = minhash_signatures(table["text"].to_pylist(), settings.num_perm, settings.ngram, settings.seed)
    features = table.drop(["text"]).append_column(
        "signature", pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel()), settings.num_perm)
    )
    write_features(features, out)
    return out


def measured(function, *args):
    """function(*args), with the CPU seconds it took and the peak RSS (MiB) of the process that ran it."""
    start = time.process_time()
    result = function(*args)
    return result, time.process_time() - start, peak_rss_mib(), os.getpid()


class Jobs:
    """A map_ for the dedup functions that keeps each job's CPU seconds and its process's peak RSS."""

    def __init__(self, pool_map):
        self.pool_map, self.cpu, self.peak = pool_map, 0.0, {}

    def __call__(self, function, *args):
        n = len(args[0])
        results = []
        for result, cpu, peak, pid in self.pool_map(measured, [function] * n, *args):
            results.append(result)
            self.cpu += cpu
            self.peak[pid] = max(self.peak.get(pid, 0), peak)
        return results


def run(engine: str, raws: list[Path], work: Path, settings: DedupSettings) -> dict:
    """Signatures then clustering of `raws` on `engine`: `local` (two processes, one clustering process) or `ray`
    (tasks on the cluster, bucketed clustering)."""
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.ExitStack() as stack:
        if engine == "local":
            pool = stack.enter_context(ProcessPoolExecutor(2))
            jobs = Jobs(lambda *a: list(pool.map(*a)))
        else:
            jobs = Jobs(ray_map)
        features = jobs(sign_chunk, raws, [work / engine / r.name for r in raws], [settings] * len(raws))
    signed = time.perf_counter() - start
    if engine == "local":  # the local pool is closed by now: clustering runs in this one process, as the asset's does
        result = find_duplicates(features, settings, work_dir=work)
    else:
        result = find_duplicates_parallel(features, settings, work_dir=work, map_=jobs)
    return {
        "result": result,
        "wall": time.perf_counter() - start,
        "signatures_wall": signed,
        "cpu": jobs.cpu + time.process_time() - cpu,
        "peaks": {"driver": peak_rss_mib(), **{f"worker {pid}": p for pid, p in jobs.peak.items()}},
    }


def quality(result, planted: list[tuple[str, str, float]], settings: DedupSettings) -> str:
    cluster_of = {}
    for c in result.clusters.to_pylist():
        for sample in [c["kept_id"], *c["dropped_ids"]]:
            cluster_of[sample] = c["cluster_id"]
    truth = {(a, b) for a, b, j in planted if j >= settings.text_threshold}
    found = {tuple(sorted((a, b))) for c in result.clusters.to_pylist() for a in [c["kept_id"]] for b in c["dropped_ids"]}
    precision = len([p for p in found if p in truth or p[::-1] in truth]) / max(1, len(found))
    lines = [f"pairs found {len(found)}, planted at J >= {settings.text_threshold}: {len(truth)}, precision {precision:.4f}"]
    for low, high in BANDS:
        band = [(a, b) for a, b, j in planted if low <= j < high]
        hit = sum(a in cluster_of and cluster_of.get(a) == cluster_of.get(b) for a, b in band)
        lines.append(f"recall at J in [{low}, {min(high, 1.0)}]: {hit}/{len(band)} = {hit / max(1, len(band)):.4f}")
    return "; ".join(lines)


def start_ray_cluster():
    """A head without CPUs and two worker nodes of one CPU each, every process on the loopback."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def measure(engine: str, work: Path) -> None:
    """In a fresh process, so that each engine's peak RSS is its own: run one engine on the chunks under `work`."""
    settings = DedupSettings()
    raws = sorted((work / "raw").glob("*.parquet"))
    cluster = start_ray_cluster() if engine == "ray" else None
    try:
        out = run(engine, raws, work, settings)
    finally:
        if cluster:
            import ray

            ray.shutdown()
            cluster.shutdown()
    result = out.pop("result")
    pq.write_table(result.clusters, work / f"{engine}-clusters.parquet")
    pq.write_table(result.duplicates, work / f"{engine}-duplicates.parquet")
    print(json.dumps({**out, "rows": result.rows, "dropped": result.duplicates.num_rows}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--engines", nargs="+", default=["local", "ray"])
    parser.add_argument("--measure", nargs=2, metavar=("ENGINE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], Path(args.measure[1]))
        return
    settings = DedupSettings()
    print(f"policy {settings.policy}, a bucket per {settings.bucket_rows} rows, {CHUNK_ROWS} rows a chunk, {os.cpu_count()} cores")
    for rows in args.rows:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            start = time.perf_counter()
            raws, planted = generate(Path(tmp), rows)
            print(
                f"\n{rows} rows in {len(raws)} chunks, {settings.bucket_count(rows)} buckets, {len(planted)} planted copies "
                f"(generated in {time.perf_counter() - start:.0f} s)"
            )
            walls = {}
            for engine in args.engines:
                load = os.getloadavg()[0]
                child = subprocess.run(
                    [sys.executable, __file__, "--measure", engine, tmp],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                )
                out = json.loads(child.stdout.strip().splitlines()[-1])
                walls[engine] = out["wall"]
                peaks = out["peaks"]
                result = DedupResult(
                    out["rows"],
                    pq.read_table(Path(tmp) / f"{engine}-duplicates.parquet"),
                    pq.read_table(Path(tmp) / f"{engine}-clusters.parquet"),
                )
                print(
                    f"  {engine:5s} wall {out['wall']:.1f} s (signatures {out['signatures_wall']:.1f} s), CPU {out['cpu']:.1f} s, "
                    f"{rows / out['cpu']:.0f} captions per CPU-second, {out['dropped']} dropped; peak RSS MiB: driver "
                    f"{peaks['driver']:.0f}, workers "
                    + ", ".join(f"{v:.0f}" for k, v in sorted(peaks.items()) if k != "driver")
                    + f"; load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
                )
                print(f"        {quality(result, planted, settings)}")
            if len(walls) == 2:
                same = all(
                    (Path(tmp) / f"local-{n}.parquet").read_bytes() == (Path(tmp) / f"ray-{n}.parquet").read_bytes()
                    for n in ("clusters", "duplicates")
                )
                print(f"  same clusters and duplicates, byte for byte: {same}; ray / local wall {walls['ray'] / walls['local']:.2f}")


if __name__ == "__main__":
    main()
