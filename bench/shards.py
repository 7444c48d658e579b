"""Shard writing (samples/s, MB/s) against webdataset.ShardWriter in the same run, and reading back
through webdataset with image decode (samples/s per core).

    .venv/bin/python bench/shards.py [--samples 3000]
"""

import argparse
import hashlib
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from beni_pipeline.prep.shard import ShardSettings, plan_shards, write_shards


def stage(root: Path, n: int) -> tuple[pa.Table, pa.Table]:
    """One chunk of n noisy 384x384 JPEGs (~60 KB each) in a staging tar, as the downloader leaves it."""
    rng = np.random.default_rng(0)
    (root / "c0").mkdir(parents=True)
    manifest, index = [], []
    base = rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)
    with tarfile.open(root / "c0" / "part-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            sample_id = hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest()
            out = io.BytesIO()
            Image.fromarray(np.roll(base, i, axis=1)).save(out, "JPEG", quality=85)
            info = tarfile.TarInfo(f"{sample_id}.jpg")
            info.size = len(out.getvalue())
            tar.addfile(info, io.BytesIO(out.getvalue()))
            caption = " ".join(f"w{j}" for j in rng.integers(0, 50, rng.integers(5, 40)))
            manifest.append(
                {"sample_id": sample_id, "url": "", "caption": caption, "conversations": "", "source": "bench", "row": i, "chunk": "c0"}
            )
            index.append(
                {
                    "sample_id": sample_id,
                    "status": "ok",
                    "tar": "part-00000.tar",
                    "offset": tar.offset - -(-info.size // 512) * 512,
                    "size": info.size,
                    "ext": "jpg",
                    "width": 384,
                    "height": 384,
                }
            )
    return pa.Table.from_pylist(manifest), pa.Table.from_pylist(index)


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(f"w{j}" for j in range(50))], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, index = stage(root / "downloaded", args.samples)
        settings = ShardSettings(max_samples=500)
        start = time.perf_counter()
        plan = plan_shards(manifest, index, manifest["sample_id"].combine_chunks(), tokenizer(), settings)
        t_plan = time.perf_counter() - start
        start = time.perf_counter()
        built = write_shards(plan, root / "downloaded", root / "shards", settings)
        t_write = time.perf_counter() - start
        mb = sum(e["bytes"] for e in built["shardlist"]) / 1e6
        start = time.perf_counter()
        write_shards(plan, root / "downloaded", root / "shards", settings)
        t_reuse = time.perf_counter() - start

        start = time.perf_counter()
        with wds.ShardWriter(str(root / "wds-%06d.tar"), maxcount=500, verbose=0) as sink:
            for r in plan.select(["sample_id", "offset", "size", "json"]).to_pylist():
                with open(root / "downloaded" / "c0" / "part-00000.tar", "rb") as f:
                    f.seek(r["offset"])
                    sink.write({"__key__": r["sample_id"], "jpg": f.read(r["size"]), "json": r["json"]})
        t_wds = time.perf_counter() - start

        urls = [str(root / "shards" / e["url"]) for e in built["shardlist"]]
        start, cpu = time.perf_counter(), time.process_time()
        count = sum(1 for s in wds.WebDataset(urls, shardshuffle=False).decode("rgb8") if s["jpg"].shape[0] == 384)
        t_read, c_read = time.perf_counter() - start, time.process_time() - cpu
        assert count == args.samples

    n = args.samples
    print(f"{n} samples, 384x384 JPEG ~{mb / n * 1e3:.0f} KB each, {len(built['shardlist'])} shards of <= 500")
    print(f"  plan (tokenize + sort)      {n / t_plan:9.0f} samples/s")
    print(f"  write_shards                {n / t_write:9.0f} samples/s  {mb / t_write:6.0f} MB/s (fsync per shard, sha256 inline)")
    print(f"  webdataset.ShardWriter      {n / t_wds:9.0f} samples/s  {mb / t_wds:6.0f} MB/s  -> beni {t_wds / t_write:.2f}x")
    print(f"  re-run, all shards reused   {t_reuse:9.2f} s (sha256 check of every shard)")
    print(f"  read back, decode rgb8      {n / t_read:9.0f} samples/s wall, {n / c_read:.0f} samples/s per CPU-second")
    print(
        json.dumps({"write_samples_s": round(n / t_write), "write_mb_s": round(mb / t_write), "read_samples_s_per_core": round(n / c_read)})
    )


if __name__ == "__main__":
    main()
