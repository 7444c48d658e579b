"""MinHash signatures: docs/s per core against datasketch (naive and bulk), same run, same texts; plus the
peak memory of `find_duplicates` per million rows.

    .venv/bin/python bench/minhash.py [--docs 20000] [--cluster-rows 200000]
"""

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasketch import MinHash

from beni_pipeline.prep.dedup import (
    THUMB,
    DedupSettings,
    find_duplicates,
    minhash_signatures,
    shingles,
)


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(5000)])
    zipf = np.minimum(rng.zipf(1.3, size=n * 25), 5000) - 1
    lengths = rng.integers(5, 26, n)
    starts = np.r_[0, np.cumsum(lengths)]
    return [" ".join(vocab[zipf[starts[i] : starts[i + 1]]]) for i in range(n)]


def cpu_seconds(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def bench_signatures(texts: list[str], ngram: int, num_perm: int) -> None:
    def naive():
        out = []
        for text in texts:
            m = MinHash(num_perm=num_perm)
            for s in shingles(text, ngram):
                m.update(s)
            out.append(m.hashvalues)
        return np.array(out)

    def bulk():
        return np.array([m.hashvalues for m in MinHash.bulk([shingles(t, ngram) for t in texts], num_perm=num_perm)])

    def bulk_crc32():
        return np.array([m.hashvalues for m in MinHash.bulk([shingles(t, ngram) for t in texts], num_perm=num_perm, hashfunc=zlib.crc32)])

    ours, t_ours = cpu_seconds(lambda: minhash_signatures(texts, num_perm, ngram))
    _, t_naive = cpu_seconds(naive)
    _, t_bulk = cpu_seconds(bulk)
    reference, t_bulk_crc32 = cpu_seconds(bulk_crc32)
    assert np.array_equal(ours, reference), "signatures differ from datasketch's with hashfunc=zlib.crc32"
    n = len(texts)
    print(f"{n} captions, word {ngram}-grams, num_perm {num_perm} (docs/s per core, CPU time of this process)")
    print(f"  datasketch naive  {n / t_naive:9.0f}")
    print(f"  datasketch bulk   {n / t_bulk:9.0f}")
    print(f"  datasketch bulk, hashfunc=crc32 {n / t_bulk_crc32:9.0f}")
    print(
        f"  beni              {n / t_ours:9.0f}   = {t_naive / t_ours:.1f}x naive, {t_bulk / t_ours:.1f}x bulk, "
        f"{t_bulk_crc32 / t_ours:.1f}x bulk with crc32 (identical signatures to that one)"
    )


def write_features(out: Path, rows: int, files: int = 4, dup_rate: float = 0.05, seed: int = 0) -> list[Path]:
    """Synthetic feature files: random captions, phashes and thumbnails, with planted exact/near copies."""
    rng = np.random.default_rng(seed)
    settings = DedupSettings()
    texts = captions(rows, seed)
    phash = rng.integers(0, 2**63, rows, dtype=np.uint64)
    thumbs = rng.integers(0, 256, (rows, THUMB * THUMB), dtype=np.uint8)
    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(rows)]
    copies = rng.choice(rows, int(rows * dup_rate), replace=False)
    sources = rng.integers(0, rows, len(copies))
    for c, s in zip(copies, sources):
        texts[c], phash[c], thumbs[c] = texts[s], phash[s] ^ np.uint64(1 << int(rng.integers(64))), thumbs[s]
        if c % 4 == 0:
            sha[c] = sha[s]
    signatures = minhash_signatures(texts, settings.num_perm, settings.ngram, settings.seed)
    paths = []
    for f, part in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.table(
            {
                "sample_id": [f"{i:016x}" for i in part],
                "content_sha256": [sha[i] for i in part],
                "phash": pa.array(phash[part], pa.uint64()),
                "thumb": pa.array([thumbs[i].tobytes() for i in part], pa.binary(THUMB * THUMB)),
                "signature": pa.FixedSizeListArray.from_arrays(pa.array(signatures[part].ravel()), settings.num_perm),
            }
        )
        paths.append(out / f"chunk-{f}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def measure_cluster(paths: list[str], policy: str) -> None:
    """Run in a fresh process: peak RSS of find_duplicates above the process's RSS before it."""
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024  # current RSS, KiB
    start = time.perf_counter()
    result = find_duplicates([Path(p) for p in paths], DedupSettings(policy=policy))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = result.rows
    print(
        f"  {policy:15s} {rows} rows, {result.duplicates.num_rows} dropped, {seconds:.1f} s, "
        f"peak RSS +{(peak - before) / 1024:.0f} MiB = {(peak - before) / 1024 / rows * 1e6:.0f} MiB per million rows"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--cluster-rows", type=int, default=200_000)
    parser.add_argument("--policies", nargs="*", default=["text_and_image", "text_or_image"])
    parser.add_argument("--measure", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="text_and_image", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure_cluster(args.measure, args.policy)
        return
    bench_signatures(captions(args.docs), ngram=3, num_perm=128)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_features(Path(tmp), args.cluster_rows)
        size = sum(p.stat().st_size for p in paths)
        print(f"find_duplicates on {args.cluster_rows} synthetic rows (5% planted copies, feature files {size / 2**20:.0f} MiB):")
        for policy in args.policies:
            subprocess.run(
                [sys.executable, __file__, "--policy", policy, "--measure", *map(str, paths)],
                check=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            )


if __name__ == "__main__":
    main()
