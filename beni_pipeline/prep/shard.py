"""Length-sorted WebDataset shards of the kept samples, with an index; byte-identical and resumable.

`plan_shards` measures every kept sample (text tokens + image tokens), sorts by (length, sample_id) and
assigns shards; `write_shards` writes `{name}-{000000}.tar` from the staging tars, each to a temp name
then renamed, with a sidecar under `.parts/` that lets a re-run after a kill keep finished shards and
redo only the rest; `index.json` (wids-compatible shard list + per-shard stats) and `samples.parquet`
come last. `batch_order` turns the lengths into a seeded bucketed batch order for training.
"""

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydantic

from beni_model.files import atomic_path
from beni_pipeline.prep.dedup import sample_text
from beni_pipeline.prep.files import write_bytes_atomic, write_parquet_atomic

BLOCK = tarfile.BLOCKSIZE
_FORMAT_VERSION = 1
# What a sample's .json carries (+ its token length); manifests written before transcripts or lines existed lack those columns.
PAYLOAD_COLUMNS = ["sample_id", "caption", "conversations", "transcript", "lines", "source", "url", "width", "height"]


class ShardSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    name: str = "train"
    max_samples: int = 500  # per shard: several shards even for small sets, so every rank reads its own
    max_bytes: int = 256 * 2**20  # per shard, tar headers included
    image_tokens: int = 64  # tokens the model spends on one image (e.g. 64 after pixel shuffle)

    def model_post_init(self, _context) -> None:
        if not self.name or any(c in self.name for c in "/\\.") or self.name.startswith("-"):
            raise ValueError(f"ShardSettings.name {self.name!r} must be a plain file-name stem without '/', '\\\\' or '.'")
        if self.max_samples < 1 or self.max_bytes < 2**16 or self.image_tokens < 0:
            raise ValueError("ShardSettings needs max_samples >= 1, max_bytes >= 65536 and image_tokens >= 0")


def token_lengths(texts: list[str], tokenizer, image_tokens: int, batch: int = 4096) -> np.ndarray:
    """int64 tokens per sample: the tokenizer's ids for the text (no special tokens) plus one image."""
    lengths = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch):
        ids = tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
        lengths[start : start + len(ids)] = [len(i) for i in ids]
    return lengths + image_tokens


def plan_shards(
    manifest: pa.Table,
    index: pa.Table,
    kept: pa.Array,
    tokenizer,
    settings: ShardSettings = ShardSettings(),
    image_text: Callable[[dict], str] | None = None,
) -> pa.Table:
    """One row per kept sample in shard order: where its image is staged, its `.json` payload, length, shard.

    manifest: the manifest rows (any superset of the kept ids); index: the downloaders' index rows of those
    chunks concatenated (tar names are relative to `<downloaded_root>/<chunk>/`). `image_text(payload)`: the text the
    model's extensions put after a sample's image (beni_model.data.image_text), counted in its length."""
    rows = manifest.filter(pc.is_in(manifest["sample_id"], value_set=kept))
    if rows.num_rows != len(pc.unique(kept)):
        raise ValueError(f"{len(pc.unique(kept)) - rows.num_rows} kept ids are missing from the manifest; pass every chunk's rows")
    ok = index.filter(pc.equal(index["status"], "ok")).select(["sample_id", "tar", "offset", "size", "ext", "width", "height"])
    rows = rows.join(ok, "sample_id", join_type="inner")
    if rows.num_rows != len(pc.unique(kept)):
        raise ValueError("some kept ids have no ok download in the index; pass the index rows of every chunk")
    for key in rows["sample_id"].to_pylist():
        if not key or any(c in key for c in "./\\") or key.startswith("_"):
            raise ValueError(f"sample_id {key!r} cannot be a WebDataset key (no dots, slashes or leading underscore)")
    payloads = [
        {
            "sample_id": r["sample_id"],
            "caption": r["caption"],
            "conversations": json.loads(r["conversations"]) if r["conversations"] else [],
            "source": r["source"],
            "url": r["url"],
            "width": r["width"],
            "height": r["height"],
            **({"transcript": r["transcript"]} if r.get("transcript") else {}),
            **({"lines": json.loads(r["lines"])} if r.get("lines") else {}),
        }
        for r in rows.select([c for c in PAYLOAD_COLUMNS if c in rows.column_names]).to_pylist()
    ]
    texts = [
        sample_text(p["caption"], r) + (image_text(p) if image_text else "") for p, r in zip(payloads, rows["conversations"].to_pylist())
    ]
    lengths = token_lengths(texts, tokenizer, settings.image_tokens)
    payloads = [
        json.dumps({**p, "length": int(n)}, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
        for p, n in zip(payloads, lengths)
    ]
    rows = rows.select(["sample_id", "chunk", "tar", "offset", "size", "ext"]).append_column("length", pa.array(lengths))
    rows = rows.append_column("json", pa.array(payloads, pa.binary()))
    rows = rows.sort_by([("length", "ascending"), ("sample_id", "ascending")])
    return rows.append_column("shard", pa.array(_assign_shards(rows, settings), pa.int64()))


def write_shards(
    plan: pa.Table, downloaded_root: Path, out_dir: Path, settings: ShardSettings = ShardSettings(), map_: Callable | None = None
) -> dict:
    """Write (or keep, when already complete and unchanged) every shard of the plan; returns the index.

    `map_(write_shard, *argument lists)` writes the shards in parallel (a Ray cluster's tasks over a shared folder):
    each shard's bytes depend on its own rows alone, so the shards and the index are the same either way."""
    out_dir, parts = Path(out_dir), Path(out_dir) / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{settings.name}-*.tmp*"):
        stale.unlink()
    shards = plan["shard"].to_numpy()
    bounds = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1], True]) if len(shards) else np.array([0])
    slices = [plan.slice(bounds[k], bounds[k + 1] - bounds[k]) for k in range(len(bounds) - 1)]
    if map_ is None:
        with _Staging(Path(downloaded_root)) as staging:
            entries = [_write_shard(rows, k, staging, out_dir, settings) for k, rows in enumerate(slices)]
    else:
        n = len(slices)
        entries = list(map_(write_shard, slices, range(n), [Path(downloaded_root)] * n, [out_dir] * n, [settings] * n))
    names = {e["url"] for e in entries}
    for old in out_dir.glob(f"{settings.name}-*.tar"):
        if old.name not in names:
            old.unlink()
            (parts / f"{old.name}.json").unlink(missing_ok=True)
    index = {
        "wids_version": 1,
        "name": settings.name,
        "format_version": _FORMAT_VERSION,
        "settings": settings.model_dump(),
        "samples": plan.num_rows,
        "shardlist": entries,
    }
    write_bytes_atomic(out_dir / "index.json", json.dumps(index, indent=1).encode())
    write_parquet_atomic(plan.select(["sample_id", "shard", "length"]), out_dir / "samples.parquet")
    return index


def read_index(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "index.json").read_text())


def verify_shards(out_dir: Path) -> list[str]:
    """Shards whose file is missing or whose sha256 or size differs from the index (empty when all match)."""
    bad = []
    for entry in read_index(out_dir)["shardlist"]:
        path = Path(out_dir) / entry["url"]
        if not path.exists() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            bad.append(entry["url"])
    return bad


def batch_order(lengths: np.ndarray, batch_size: int, seed: int, batches_per_bucket: int = 32) -> list[np.ndarray]:
    """Sample indices grouped into batches of similar length: sort by length, cut into buckets of
    `batches_per_bucket` batches, shuffle inside each bucket, then shuffle the order of all batches.
    Same lengths and seed give the same batches."""
    if batch_size < 1 or batches_per_bucket < 1:
        raise ValueError("batch_order needs batch_size >= 1 and batches_per_bucket >= 1")
    rng = np.random.default_rng(seed)
    order = np.argsort(np.asarray(lengths), kind="stable")
    bucket = batch_size * batches_per_bucket
    batches = []
    for start in range(0, len(order), bucket):
        members = rng.permutation(order[start : start + bucket])
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _assign_shards(rows: pa.Table, settings: ShardSettings) -> list[int]:
    """Greedy in plan order: a new shard when the next sample would pass max_samples or max_bytes."""
    member_bytes = [_padded(size) + _padded(len(payload)) for size, payload in zip(rows["size"].to_pylist(), rows["json"].to_pylist())]
    end = 2 * BLOCK + tarfile.RECORDSIZE  # two zero blocks, then padding to a whole record, at most
    shard, count, used, out = 0, 0, end, []
    for n in member_bytes:
        if count and (count >= settings.max_samples or used + n > settings.max_bytes):
            shard, count, used = shard + 1, 0, end
        out.append(shard)
        count, used = count + 1, used + n
    return out


def write_shard(rows: pa.Table, k: int, downloaded_root: Path, out_dir: Path, settings: ShardSettings) -> dict:
    """Shard `k` of the plan (its rows), written or kept: a job for any engine; returns its index entry."""
    with _Staging(Path(downloaded_root)) as staging:
        return _write_shard(rows, k, staging, out_dir, settings)


def _write_shard(rows: pa.Table, k: int, staging: "_Staging", out_dir: Path, settings: ShardSettings) -> dict:
    name = f"{settings.name}-{k:06d}.tar"
    path, sidecar = out_dir / name, out_dir / ".parts" / f"{name}.json"
    fingerprint = _fingerprint(rows)
    if sidecar.exists() and path.exists():
        entry = json.loads(sidecar.read_text())
        if entry.get("fingerprint") == fingerprint and path.stat().st_size == entry["bytes"] and _sha256(path) == entry["sha256"]:
            return {key: value for key, value in entry.items() if key != "fingerprint"}
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        with tarfile.open(fileobj=_Hashing(raw, digest), mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for r in rows.select(["sample_id", "chunk", "tar", "offset", "size", "ext", "json"]).to_pylist():
                _add(tar, f"{r['sample_id']}.{r['ext']}", staging.read(r["chunk"], r["tar"], r["offset"], r["size"]))
                _add(tar, f"{r['sample_id']}.json", r["json"])
        raw.flush()
        os.fsync(raw.fileno())
    lengths = rows["length"].to_numpy()
    entry = {
        "url": name,
        "nsamples": rows.num_rows,
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        "mean_length": round(float(lengths.mean()), 3),
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }
    write_bytes_atomic(sidecar, json.dumps({**entry, "fingerprint": fingerprint}).encode())
    return entry


def _add(tar: tarfile.TarFile, member: str, data: bytes) -> None:
    info = tarfile.TarInfo(member)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _fingerprint(rows: pa.Table) -> str:
    """What a shard's bytes depend on: its samples' payloads and where their images are staged."""
    digest = hashlib.sha256(f"v{_FORMAT_VERSION}".encode())
    for r in rows.select(["sample_id", "chunk", "tar", "offset", "size", "ext", "json"]).to_pylist():
        digest.update(f"{r['sample_id']} {r['chunk']} {r['tar']} {r['offset']} {r['size']} {r['ext']}\n".encode())
        digest.update(r["json"])
    return digest.hexdigest()


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK + BLOCK  # header + data rounded up to whole blocks


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _Hashing:
    """A file to write that hashes what passes through, so a shard is not read back to get its sha256."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


class _Staging:
    """Reads staged images by (chunk, tar, offset, size), keeping the 64 most recent tars open."""

    def __init__(self, root: Path, keep_open: int = 64):
        self.root, self.keep_open, self.files = root, keep_open, OrderedDict()

    def read(self, chunk: str, tar: str, offset: int, size: int) -> bytes:
        key = (chunk, tar)
        if key not in self.files:
            if len(self.files) >= self.keep_open:
                self.files.popitem(last=False)[1].close()
            self.files[key] = open(self.root / chunk / tar, "rb")
        self.files.move_to_end(key)
        data = os.pread(self.files[key].fileno(), size, offset)
        if len(data) != size:
            raise ValueError(
                f"{self.root / chunk / tar} ends before byte {offset + size}; the staging tar is truncated, re-run its download"
            )
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()
