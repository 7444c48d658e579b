"""Generated-corpus benchmark: how fast `generate_corpus` renders and writes samples.

Generates a fresh corpus into a temporary folder and prints samples/s (wall clock), samples/s per
worker process, and samples per CPU-second of the workers (the per-core figure that holds up when
other jobs share the machine), plus the load average, so a run on a busy machine reads as one.

    .venv/bin/python bench/corpus.py [--samples 5000] [--seed 0] [--photos 0.5]
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

from beni_pipeline.prep.synthetic import CHUNK, CorpusSettings, generate_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", type=float, default=0.0, help="share of the samples photographed (the GPU corpus's: 0.5)")
    args = parser.parse_args()
    settings = CorpusSettings(samples=args.samples, seed=args.seed, photos=args.photos)
    processes = min(os.cpu_count() or 1, -(-args.samples // CHUNK))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        corpus = generate_corpus(Path(tmp), settings)
        seconds = time.perf_counter() - start
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [json.loads(line) for line in corpus.read_text().splitlines()]
        image_bytes = sum(p.stat().st_size for p in (Path(tmp) / "images").iterdir())
    assert len(rows) == args.samples
    cpu = children.ru_utime + children.ru_stime
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after"
    )
    print(f"{args.samples} samples in {seconds:.1f} s with {processes} worker processes")
    print(f"samples/s:                {args.samples / seconds:.0f}")
    print(f"samples/s per process:    {args.samples / seconds / processes:.0f}")
    print(f"samples per CPU-second:   {args.samples / cpu:.0f}  (workers' user+sys time {cpu:.1f} s)")
    print(f"mean JPEG size:           {image_bytes / args.samples / 1024:.1f} KiB")
    print("kinds:", dict(sorted(Counter(r["kind"] for r in rows).items())))


if __name__ == "__main__":
    main()
