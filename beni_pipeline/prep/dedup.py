"""Near-duplicate detection: MinHash over caption/conversation text, exact and perceptual image hashes.

Flow, one download partition (chunk) at a time, then one global clustering:

1. `write_chunk_features` hashes a chunk once: per ok sample its sample_id, content_sha256, phash, a 16x16
   grey thumbnail of the stored image and a MinHash signature of its text, cached as
   `<features_dir>/<chunk>.parquet` (`cached_features` tells which chunks are current, so a rebuild hashes
   only new or re-downloaded chunks).
2. `find_duplicates` turns every sample into band keys (exact image hash, phash band pairs, MinHash LSH
   bands), spills (key, row, phash) entries into hash buckets on disk, groups each bucket by sorting and pairs
   the rows of a group whose whole phashes are near, confirms those candidate pairs against the policy in groups
   (each reading the features of just its pairs' rows) and joins the confirmed pairs with union-find. Memory is
   bounded by one chunk, one bucket (`bucket_rows` rows' keys) or one group of pairs, not by the corpus: see
   `bench/scale.py` for the measured peaks.

The perceptual hash (a 64-bit dHash) is `beni_pipeline.prep.images.dhash`, the function the downloader stores in its
index: grey-scale, BILINEAR resize to 9x8, bit = pixel brighter than its right neighbour, row-major,
first bit most significant, written as 16 lowercase hex characters.

Over 400 lines because signatures, image features and the bucketed clustering are one algorithm whose parts share
the settings and the band-key layout; split apart, each would need the others to be read.
"""

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
import resource
import socket
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import as_completed
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydantic
from datasketch import LeanMinHash, MinHash
from PIL import Image

from beni_pipeline.prep.files import write_parquet_atomic
from beni_pipeline.prep.processes import process_pool

Policy = Literal["text_and_image", "text_or_image", "image"]
POLICIES = ("text_and_image", "text_or_image", "image")
REASONS = ("image-exact", "image-near", "text")  # strongest evidence first

_MAX32 = np.uint32(0xFFFFFFFF)
_WORD = re.compile(r"\w+")
_FEATURES_VERSION = "2"


class DedupSettings(pydantic.BaseModel):
    """What counts as a duplicate.

    policy:
      - "text_and_image" (default): two samples are duplicates when their images match (same bytes, or
        dHash within `phash_max_distance`) AND their texts are near (MinHash Jaccard >= `text_threshold`).
        A generic caption ("a photo") never drops a distinct image, and one image with different
        questions/answers keeps every conversation. Text alone never drops a sample: templated texts
        (OCR answers, "a photo of the word X") differ in one word and Jaccard cannot tell that word matters.
      - "text_or_image": an image match alone, or a text match alone (Jaccard >= `text_alone_threshold`,
        found by LSH), is a duplicate. Aggressive: drops distinct images with generic captions.
      - "image": an image match alone, text ignored.

    Text is caption + conversation turns, lower-cased, split into words (`\\w+`), shingled into word
    `ngram`s. Captions are short (5-20 words): with word 3-grams one substituted word in a 6-word caption
    leaves Jaccard 1/7, with single words 5/7, so the default shingle is one word and the confirmation
    threshold 0.5 (a light edit of a short caption stays above it; a different question about the same
    image falls below). Texts with no words all share the empty signature, so they match each other.

    LSH (used by "text_or_image" only): `lsh_bands` x `lsh_rows` = 21 x 6 of 128 permutations makes a pair
    a candidate with probability 1 - (1 - J^6)^21: 0.998 at J = 0.8, 0.28 at J = 0.5, 0.015 at J = 0.3.
    datasketch's MinHashLSH(threshold=0.8) picks 9 x 13, which finds only ~40% of J = 0.8 pairs.
    Candidates are always confirmed on the estimated Jaccard, so extra candidates cost time, not precision.

    Images: dHash of re-encoded or resized copies stays within a few bits (on the default corpus, planted
    copies found: 91% within 3 bits, 97% within 5, with no false pair at either); `phash_max_distance` d
    cuts the 64 bits into d + 2 bands and keys on every pair of bands (pigeonhole: two hashes within d bits
    agree exactly on at least two bands; with `phash_key_bands` m, d + m bands taken m at a time), so near
    images are found by grouping, not by comparing all pairs. At d = 5 a key is two ~9-bit bands (~18 bits), so
    unrelated rows share one ~21 N^2 / 2^19 times (40 M at 1 M rows): inside a bucket each such pair is dropped
    on its whole 64-bit hashes before any feature is read, which keeps that square term to a few passes over
    arrays a pair, but it still grows as N^2, and a key group holds ~N / 2^18 unrelated rows: past ~17 M rows that is more
    than `max_group_pairs` + 1, so copies in a group could go unpaired. `phash_key_bands` = 3 (56 keys of ~24
    bits at d = 5: 2.6x the spilled keys, groups of ~N / 2^24, 1/25 of the chance pairs) is for corpora that
    large; both find the same pairs. Left empty (the default), it is chosen from the corpus's rows (`key_bands`):
    the fewest bands, at least 2, whose key groups hold no more unrelated rows than `max_group_pairs` + 1.

    Under "text_and_image" the candidates come from these image keys, not from the text's LSH bands: a band
    catches a pair with a chance set by the texts' real Jaccard, and captions share common words (unrelated ones
    often ~0.15), so bands loose enough to catch J = 0.5 pairs would make a large share of all pairs candidates.

    dHash alone is weak on flat images (a plain background hashes to nearly all zeros, so distinct text renders
    land within 3 bits of each other), so a near pair must also have 16x16 grey thumbnails within
    `thumb_max_diff` grey levels at every pixel (measured: copies <= 6, distinct renders that dHash calls near
    >= 16). Inside a key group rows are ordered by thumbnail brightness, so copies sit next to each other even in
    a crowded group.

    `bucket_rows`: rows per bucket of band keys (`buckets` sets the count instead). A bucket is what one clustering job
    sorts and pairs, so its memory is set by this and not by the corpus; the buckets are the same on every engine,
    and any count finds the same pairs (a key's rows are always in one bucket).

    `max_group_pairs`: inside one key group each row is compared with at most this many following rows,
    so a degenerate group (a blank image shared by 100k samples) costs O(n * max_group_pairs), not O(n^2);
    union-find still chains the whole group.
    """

    model_config = pydantic.ConfigDict(frozen=True)

    policy: Policy = "text_and_image"
    num_perm: int = 128
    seed: int = 1
    ngram: int = 1
    text_threshold: float = 0.5
    text_alone_threshold: float = 0.8
    lsh_bands: int = 21
    lsh_rows: int = 6
    phash_max_distance: int = 5
    phash_key_bands: int | None = None
    thumb_max_diff: int = 12
    max_group_pairs: int = 64
    buckets: int | None = None
    bucket_rows: int = 50_000
    workers: int = pydantic.Field(default_factory=lambda: os.cpu_count() or 1, description="processes hashing chunks in parallel")

    def model_post_init(self, _context) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"DedupSettings.policy is {self.policy!r}; use one of {', '.join(POLICIES)}")
        if self.num_perm < 2 or self.ngram < 1:
            raise ValueError(f"DedupSettings needs num_perm >= 2 and ngram >= 1, got {self.num_perm} and {self.ngram}")
        if not (0 < self.text_threshold <= 1 and 0 < self.text_alone_threshold <= 1):
            raise ValueError("DedupSettings.text_threshold and text_alone_threshold must be in (0, 1]")
        if self.lsh_bands * self.lsh_rows > self.num_perm or min(self.lsh_bands, self.lsh_rows) < 1:
            raise ValueError(
                f"DedupSettings lsh_bands x lsh_rows = {self.lsh_bands} x {self.lsh_rows} must be positive and at "
                f"most num_perm = {self.num_perm}"
            )
        if not 0 <= self.phash_max_distance <= 15:
            raise ValueError(f"DedupSettings.phash_max_distance must be 0..15 (bits of 64), got {self.phash_max_distance}")
        if self.phash_key_bands is not None and not 1 <= self.phash_key_bands <= 4:
            raise ValueError(f"DedupSettings.phash_key_bands must be 1..4 (bands joined in one key), got {self.phash_key_bands}")
        if not 0 <= self.thumb_max_diff <= 255:
            raise ValueError(f"DedupSettings.thumb_max_diff is in grey levels 0..255, got {self.thumb_max_diff}")
        if min(self.max_group_pairs, self.buckets or 1, self.bucket_rows, self.workers) < 1:
            raise ValueError("DedupSettings.max_group_pairs, buckets, bucket_rows and workers must be at least 1")

    def key_bands(self, rows: int) -> int:
        """`phash_key_bands` when set, else the fewest bands joined in a key (2 to 4) for which a key group of `rows`
        unrelated hashes (rows / 2^bits of its narrowest key) stays within `max_group_pairs` + 1 rows: 2 up to ~17M
        rows at the defaults, 3 up to ~1G."""
        if self.phash_key_bands is not None:
            return self.phash_key_bands
        d = self.phash_max_distance
        return next((m for m in (2, 3) if rows <= 2 ** (64 // (d + m) * m) * (self.max_group_pairs + 1)), 4)

    def bucket_count(self, rows: int) -> int:
        """`buckets` when set, else one bucket per `bucket_rows` rows: a bucket job's keys, and so its memory and
        its sort, stay the same size whatever the corpus's."""
        return self.buckets or max(1, -(-rows // self.bucket_rows))


# ---- MinHash -------------------------------------------------------------------------------------


def sample_text(caption: str, conversations: str) -> str:
    """The text a sample is compared on: its caption and every conversation turn, `<image>` removed."""
    parts = [caption] if caption else []
    if conversations:
        parts += [turn["value"] for turn in json.loads(conversations)]
    return "\n".join(parts).replace("<image>", " ")


def shingles(text: str, ngram: int) -> list[bytes]:
    """Word n-grams of the lower-cased text; a text shorter than n words is one shingle; no words, none."""
    words = _WORD.findall(text.lower())
    if len(words) <= ngram:
        return [" ".join(words).encode()] if words else []
    return [" ".join(words[i : i + ngram]).encode() for i in range(len(words) - ngram + 1)]


def minhash_signatures(texts: list[str], num_perm: int = 128, ngram: int = 1, seed: int = 1) -> np.ndarray:
    """uint32 [len(texts), num_perm]; row i equals datasketch `MinHash(num_perm, seed, hashfunc=zlib.crc32)`
    updated with `shingles(texts[i], ngram)` (its affine32 scheme: crc32 -> murmur3 fmix32 -> a * h + b
    mod 2^32), computed for all shingles of a batch at once. crc32 instead of datasketch's default sha1:
    the shingle hash is the one step done per shingle in Python, and crc32 costs a fifth of sha1."""
    a, b = _permutations(num_perm, seed)
    out = np.full((len(texts), num_perm), _MAX32, dtype=np.uint32)
    batch = max(1, 2_000_000 // (num_perm * 16))  # ~16 shingles a text: keeps the hash matrix near 128 MB
    for start in range(0, len(texts), batch):
        if ngram == 1:  # each word is a shingle: no joins, and a word repeated in a text hashed once
            docs = [set(_WORD.findall(t.lower())) for t in texts[start : start + batch]]
            flat = [w for doc in docs for w in doc]
            hashes = map(zlib.crc32, map(str.encode, flat))
        else:
            docs = [shingles(t, ngram) for t in texts[start : start + batch]]
            flat = [s for doc in docs for s in doc]
            hashes = map(zlib.crc32, flat)
        counts = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        if not flat:
            continue
        hv = _fmix32(np.fromiter(hashes, dtype=np.uint32, count=len(flat)))
        hashed = hv[:, None] * a[None, :] + b[None, :]
        nonempty = np.flatnonzero(counts)
        starts = (np.cumsum(counts) - counts)[nonempty]
        out[start + nonempty] = np.minimum.reduceat(hashed, starts, axis=0)
    return out


def lean_minhash(signature: np.ndarray, seed: int = 1) -> LeanMinHash:
    """A signature row as a datasketch LeanMinHash (for MinHashLSH, jaccard, serialization)."""
    return LeanMinHash(seed=seed, hashvalues=signature, scheme="affine32")


def lsh_candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Chance that LSH with bands x rows makes a pair of true Jaccard `jaccard` a candidate."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = MinHash(num_perm=num_perm, seed=seed).permutations  # datasketch's own, so signatures match
    return a.astype(np.uint32), b.astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


# ---- per-chunk features (cached) ------------------------------------------------------------------

THUMB = 16  # side of the grey thumbnail that confirms near images


def thumbnail(data: bytes) -> bytes:
    """16x16 8-bit grey thumbnail (BILINEAR) of an encoded image; JPEGs decode at reduced scale."""
    image = Image.open(io.BytesIO(data))
    image.draft("L", (THUMB * 4, THUMB * 4))
    return image.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR).tobytes()


def chunk_features(manifest_rows: pa.Table, chunk_dir: Path, settings: DedupSettings = DedupSettings()) -> pa.Table:
    """sample_id, content_sha256, phash (uint64), thumb, signature for every `ok` sample of one download chunk
    (`chunk_dir` holds the downloader's index.parquet and staging tars)."""
    index = pq.read_table(Path(chunk_dir) / "index.parquet")
    ok = index.filter(pc.equal(index["status"], "ok")).select(["sample_id", "content_sha256", "phash", "tar", "offset", "size"])
    rows = ok.join(manifest_rows.select(["sample_id", "caption", "conversations"]), "sample_id", join_type="inner")
    if rows.num_rows != ok.num_rows:
        raise ValueError(f"{ok.num_rows - rows.num_rows} ok downloads in {chunk_dir} have no manifest row; pass the chunk's manifest rows")
    rows = rows.sort_by("sample_id")
    texts = [sample_text(c, v) for c, v in zip(rows["caption"].to_pylist(), rows["conversations"].to_pylist())]
    signatures = minhash_signatures(texts, settings.num_perm, settings.ngram, settings.seed)
    phashes = np.array([int(h, 16) for h in rows["phash"].to_pylist()], dtype=np.uint64)
    return pa.table(
        {
            "sample_id": rows["sample_id"],
            "content_sha256": rows["content_sha256"],
            "phash": pa.array(phashes, pa.uint64()),
            "thumb": pa.array(_thumbnails(Path(chunk_dir), rows), pa.binary(THUMB * THUMB)),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel()), settings.num_perm),
        }
    )


def write_chunk_features(manifest_rows: pa.Table, chunk_dir: Path, out_path: Path, settings: DedupSettings = DedupSettings()) -> Path:
    """Hash one chunk and write its features parquet atomically, tagged with what it was computed from."""
    table = chunk_features(manifest_rows, chunk_dir, settings)
    table = table.replace_schema_metadata({"beni_features": _fingerprint(chunk_dir, settings)})
    write_features(table, out_path)
    return out_path


def write_features(table: pa.Table, out_path: Path) -> None:
    """A features table written atomically as `find_duplicates` reads it, without dictionary encoding: hashes and
    signatures hardly repeat, so a dictionary only costs time to build when written and to look up when read."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(table, out_path, use_dictionary=False)


def hash_chunks(
    chunks: list[tuple[Path, Path, Path]],
    settings: DedupSettings = DedupSettings(),
    done: Callable[[Path, int, float], None] = lambda *_: None,
    map_: Callable | None = None,
) -> list[Path]:
    """Hash every (chunk manifest parquet, download dir, features path) whose features are not cached, up to
    `settings.workers` chunks at a time in their own processes (hashing decodes every image: CPU-bound Python),
    or as the jobs of `map_(hash_chunk, *argument lists)` (a Ray cluster's tasks) when given.
    `done(features_path, rows, seconds)` is called as each chunk finishes. Returns the features paths hashed."""
    todo = [c for c in chunks if not cached_features(c[2], c[1], settings)]
    if map_ is not None and todo:
        for result in map_(hash_chunk, *zip(*todo), [settings] * len(todo)):
            done(*result)
        return [job[2] for job in todo]
    if len(todo) <= 1 or settings.workers == 1:
        for job in todo:
            done(*hash_chunk(*job, settings))
        return [job[2] for job in todo]
    with process_pool(min(settings.workers, len(todo))) as pool:
        for future in as_completed([pool.submit(hash_chunk, *job, settings) for job in todo]):
            done(*future.result())
    return [job[2] for job in todo]


def hash_chunk(manifest_chunk: Path, chunk_dir: Path, out_path: Path, settings: DedupSettings) -> tuple[Path, int, float]:
    """One chunk's features written to `out_path`: a job that passes paths only, for any engine; returns (out_path, rows, seconds)."""
    start = time.perf_counter()
    rows = pq.read_table(manifest_chunk)
    write_chunk_features(rows, chunk_dir, out_path, settings)
    return out_path, rows.num_rows, time.perf_counter() - start


def cached_features(out_path: Path, chunk_dir: Path, settings: DedupSettings = DedupSettings()) -> bool:
    """True when `out_path` holds features of exactly this chunk's index and these settings (skip rehashing)."""
    if not out_path.exists():
        return False
    metadata = pq.read_schema(out_path).metadata or {}
    return metadata.get(b"beni_features", b"").decode() == _fingerprint(chunk_dir, settings)


def _fingerprint(chunk_dir: Path, settings: DedupSettings) -> str:
    index_sha = hashlib.sha256((Path(chunk_dir) / "index.parquet").read_bytes()).hexdigest()
    return f"v{_FEATURES_VERSION} num_perm={settings.num_perm} seed={settings.seed} ngram={settings.ngram} index={index_sha}"


def _thumbnails(chunk_dir: Path, rows: pa.Table) -> list[bytes]:
    thumbs = [b""] * rows.num_rows
    tars, offsets, sizes = rows["tar"].to_pylist(), rows["offset"].to_pylist(), rows["size"].to_pylist()
    order = sorted(range(rows.num_rows), key=lambda i: (tars[i], offsets[i]))
    current, f = None, None
    try:
        for i in order:
            if tars[i] != current:
                if f:
                    f.close()
                current, f = tars[i], open(chunk_dir / tars[i], "rb")
            f.seek(offsets[i])
            thumbs[i] = thumbnail(f.read(sizes[i]))
    finally:
        if f:
            f.close()
    return thumbs


# ---- clustering ----------------------------------------------------------------------------------


@dataclasses.dataclass
class DedupResult:
    rows: int
    duplicates: pa.Table  # sample_id, duplicate_of, cluster_id, reason: one row per dropped sample
    clusters: pa.Table  # cluster_id, kept_id, dropped_ids, size, reasons
    candidate_pairs: int = 0  # pairs compared on their features: near image hashes (and texts sharing a band, where text alone counts)
    peak_rss_mib: dict[str, float] = dataclasses.field(default_factory=dict)  # "this process" and each job's host:pid

    def stats(self) -> dict:
        sizes = Counter(self.clusters["size"].to_pylist())
        return {
            "rows": self.rows,
            "kept": self.rows - self.duplicates.num_rows,
            "dropped": self.duplicates.num_rows,
            "duplicate_rate": self.duplicates.num_rows / max(1, self.rows),
            "clusters": self.clusters.num_rows,
            "candidate_pairs": self.candidate_pairs,
            "dropped_by_reason": dict(Counter(self.duplicates["reason"].to_pylist())),
            "cluster_size_histogram": {str(k): sizes[k] for k in sorted(sizes)},
        }


def find_duplicates(feature_paths: list[Path], settings: DedupSettings = DedupSettings(), work_dir: Path | None = None) -> DedupResult:
    """Cluster near-duplicates across all chunks' feature files; in each cluster the smallest sample_id is kept.
    The jobs of `find_duplicates_parallel`, one after another in this process."""
    return find_duplicates_parallel(feature_paths, settings, work_dir, map_=map)


def find_duplicates_parallel(
    feature_paths: list[Path], settings: DedupSettings = DedupSettings(), work_dir: Path | None = None, map_: Callable = map
) -> DedupResult:
    """`find_duplicates` cut into jobs that `map_(function, *argument lists)` runs anywhere that sees `work_dir`
    (a Ray cluster's tasks over a shared folder, or plain `map`); the result is the same, row for row.

    1. one job per chunk writes its band keys into one file, ordered by bucket (`settings.bucket_count`), and returns
       where each bucket starts in it (the shuffle goes through files);
    2. one job per bucket reads its slice of every chunk's file, pairs the rows that share a key and returns the pairs
       whose image hashes are near (two global rows, 16 bytes a pair);
    3. one job per chunk writes the features of its rows that are in candidate pairs, in the order of the confirmation
       groups (`_CONFIRM_PAIRS` pairs each, or one group where the pairs are dense) that need them;
    4. one job per group reads its rows' slice of every chunk's file and returns the pairs the policy confirms;
    5. this process joins the confirmed pairs into clusters named by their rows' sample ids.
    This process gathers the candidate pairs and their rows (16 and 8 bytes each), one offset per chunk and bucket and per
    chunk and group, the confirmed pairs and the sample ids of their rows: sizes set by the duplicates found, not by the
    corpus; no process gathers the features of every candidate row, but the one job of dense pairs. A job holds one
    chunk (steps 1 and 3), one bucket's keys (step 2: `bucket_rows` rows' worth, whatever the corpus's size) or one
    group's pairs and the features of their rows (step 4: ~0.8 KB a row). `DedupResult.peak_rss_mib` has each
    process's peak."""
    paths = sorted(Path(p) for p in feature_paths)
    offsets = _offsets(paths)
    n, buckets = len(paths), settings.bucket_count(int(offsets[-1]))
    settings = settings.model_copy(update={"phash_key_bands": settings.key_bands(int(offsets[-1]))})  # one choice for every job
    peaks = _Peaks(map_)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        ends = peaks(_spill_chunk, paths, _chunk_files(Path(tmp), "keys", n), offsets[:-1].tolist(), [buckets] * n, [settings] * n)
        starts = np.array(ends, np.int64).reshape(n, buckets + 1)  # where each bucket starts in each chunk's keys
        slices = [starts[:, b : b + 2] for b in range(buckets)]
        pairs = peaks(_candidate_pairs, [Path(tmp)] * buckets, slices, [settings] * buckets)
        candidates = _unique_pairs(np.concatenate([np.zeros((0, 2), np.int64)] + pairs))
        confirmed = _confirm_in_jobs(candidates, paths, offsets, Path(tmp), settings, peaks)
    result = _join(confirmed, paths, offsets)
    return dataclasses.replace(result, candidate_pairs=len(candidates), peak_rss_mib=peaks.report())


_CONFIRM_PAIRS = 1 << 15  # candidate pairs a confirmation job takes: the features of their rows stay near 50 MB


def _confirm_in_jobs(
    candidates: np.ndarray, paths: list[Path], offsets: np.ndarray, tmp: Path, settings: DedupSettings, map_
) -> np.ndarray:
    """int64 [pairs, 3]: the candidate pairs the policy confirms, and the reason's index (steps 3 and 4 above)."""
    groups = np.array_split(candidates, max(1, -(-len(candidates) // _CONFIRM_PAIRS)))
    rows = [_unique_rows(group) for group in groups]
    every = _unique_rows(candidates)
    if sum(map(len, rows)) > 2 * len(every):
        # dense pairs (where text alone counts, a row pairs with rows all over the corpus): every group would read the
        # features of most rows, so one job confirms them all, holding each candidate row's features once
        groups, rows = [candidates], [every]
    cuts = np.stack([np.searchsorted(r, offsets) for r in rows])  # [group, chunk + 1]: where each chunk's rows start in a group's
    counts = np.diff(cuts, axis=1)
    n = len(paths)
    wanted = [np.concatenate([r[cuts[g, i] : cuts[g, i + 1]] for g, r in enumerate(rows)]) - offsets[i] for i in range(n)]
    map_(_write_rows, paths, wanted, _chunk_files(tmp, "features", n), [settings] * n)
    starts = np.cumsum(counts, axis=0) - counts  # [group, chunk]: where a group's rows start in a chunk's file
    slices = [np.stack([starts[g], starts[g] + counts[g]], axis=1) for g in range(len(groups))]
    confirmed = map_(_confirm_group, groups, rows, [tmp] * len(groups), slices, [settings] * len(groups))
    return np.concatenate([np.zeros((0, 3), np.int64)] + confirmed)


def _write_rows(path: Path, rows: np.ndarray, out: Path, settings: DedupSettings) -> None:
    """The features of a chunk's `rows` (in that order), one packed row of bytes each, for `_confirm_group`."""
    np.save(out, _pack(_read_features(path, rows, settings)))


def _confirm_group(pairs: np.ndarray, rows: np.ndarray, folder: Path, slices: np.ndarray, settings: DedupSettings) -> np.ndarray:
    """int64 [pairs, 3]: the group's candidate pairs the policy confirms, and the reason's index; `rows` are the pairs'
    rows, sorted, whose features are the `slices` of the chunks' features files in `folder`, in chunk order."""
    files = _chunk_files(folder, "features", len(slices))
    features = _unpack(_read_rows(files, slices, _packed_width(settings), np.uint8), settings)
    left, right = np.searchsorted(rows, pairs[:, 0]), np.searchsorted(rows, pairs[:, 1])
    step = 1 << 14  # pairs compared at a time: bounds the gathered signatures and thumbnails to ~40 MB
    reason = np.concatenate(
        [np.zeros(0, np.int64)] + [_confirm(features, left[i : i + step], right[i : i + step], settings) for i in range(0, len(left), step)]
    )
    keep = reason >= 0
    return np.stack([pairs[keep, 0], pairs[keep, 1], reason[keep]], axis=1).astype(np.int64)


def _chunk_files(folder: Path, name: str, chunks: int) -> list[Path]:
    """The files the jobs of one clustering write per chunk; a job is told the folder, not the paths, so that what every
    bucket's or group's job is sent does not grow with the chunks."""
    return [folder / f"{name}-{i:06d}.npy" for i in range(chunks)]


def _join(confirmed: np.ndarray, paths: list[Path], offsets: np.ndarray) -> DedupResult:
    """The clusters of the confirmed pairs (each once), named by the sample ids of their rows."""
    nodes = _unique_rows(confirmed[:, :2])
    left, right = np.searchsorted(nodes, confirmed[:, 0]), np.searchsorted(nodes, confirmed[:, 1])
    return _clusters(_sample_ids(paths, offsets, nodes), left, right, confirmed[:, 2], rows=int(offsets[-1]))


def _sample_ids(paths: list[Path], offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The sample ids of the given global rows (sorted), reading one chunk's id column at a time."""
    ids = [np.zeros(0, dtype=object)]
    for i, path in enumerate(paths):
        mine = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
        if len(mine):
            column = pq.read_table(path, columns=["sample_id"], use_threads=False)["sample_id"]
            ids.append(np.array(column.take(pa.array(mine)).to_pylist(), dtype=object))
    return np.concatenate(ids)


def kept_ids(feature_path: Path, result: DedupResult) -> pa.Array:
    """The sample ids of one chunk's features that survive deduplication."""
    ids = pq.read_table(feature_path, columns=["sample_id"])["sample_id"]
    return ids.filter(pc.invert(pc.is_in(ids, value_set=result.duplicates["sample_id"]))).combine_chunks()


def write_result(result: DedupResult, out_dir: Path) -> None:
    """duplicates.parquet and clusters.parquet, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in (("duplicates", result.duplicates), ("clusters", result.clusters)):
        write_parquet_atomic(table, out_dir / f"{name}.parquet")


def _band_keys(table: pa.Table, settings: DedupSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint64 [rows, keys], which are used, and which are phash band keys (their pairs must have near image
    hashes): the exact image hash, the phash bands, and (only when text alone counts) the LSH bands of every text
    that has words."""
    sha = np.frombuffer(bytes.fromhex("".join(s[:16] for s in table["content_sha256"].to_pylist())), dtype=">u8")
    keys = [_fmix64(sha.astype(np.uint64) ^ np.uint64(0x5A))]
    h = table["phash"].to_numpy()
    bands = settings.phash_max_distance + settings.phash_key_bands
    edges = [64 * i // bands for i in range(bands + 1)]
    values = [(h >> np.uint64(edges[i])) & np.uint64((1 << (edges[i + 1] - edges[i])) - 1) for i in range(bands)]
    for first, *rest in itertools.combinations(range(bands), settings.phash_key_bands):
        key = values[first] ^ np.uint64((first + 1) << 56)
        for j in rest:
            key = _fmix64(key) ^ values[j] ^ np.uint64((j + 1) << 48)
        keys.append(_fmix64(key))
    used = [np.ones(table.num_rows, dtype=bool)] * len(keys)
    if settings.policy == "text_or_image":
        sig = _signatures(table, settings.num_perm)
        has_words = ~(sig == _MAX32).all(axis=1)  # wordless texts share one signature: never a text match
        for band in range(settings.lsh_bands):
            key = np.full(len(sig), np.uint64(0x9E3779B97F4A7C15 + band), dtype=np.uint64)
            for col in sig[:, band * settings.lsh_rows : (band + 1) * settings.lsh_rows].T:
                key = _fmix64(key ^ col.astype(np.uint64))
            keys.append(key)
            used.append(has_words)
    phash_key = np.zeros(len(keys), dtype=bool)
    phash_key[1 : 1 + math.comb(bands, settings.phash_key_bands)] = True
    return np.stack(keys, axis=1), np.stack(used, axis=1), phash_key


class _Peaks:
    """A map_ that also keeps the peak RSS of each process its jobs ran in; results in a list, in order."""

    def __init__(self, map_: Callable):
        self.map_, self.peak = map_, {}

    def __call__(self, function: Callable, *args) -> list:
        results = []
        for result, process, peak in self.map_(_measured, [function] * len(args[0]), *args):
            results.append(result)
            self.peak[process] = max(self.peak.get(process, 0.0), peak)
        return results

    def report(self) -> dict[str, float]:
        here = _process()
        return {"this process": round(peak_rss_mib(), 1)} | {p: round(v, 1) for p, v in sorted(self.peak.items()) if p != here}


def _measured(function: Callable, *args) -> tuple:
    return function(*args), _process(), peak_rss_mib()


def _process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: VmHWM where Linux has it. Not ru_maxrss: a process started by fork
    and exec inherits its parent's, so a small worker of a big parent reports the parent's peak as its own."""
    status = Path("/proc/self/status")
    if status.exists():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _offsets(paths: list[Path]) -> np.ndarray:
    """The global row number of each chunk's first row, and the total last: read from the parquet footers alone."""
    return np.cumsum([0] + [pq.read_metadata(path).num_rows for path in paths], dtype=np.int64)


_ROW = np.uint64(0xFFFFFFFF)  # a spilled entry's second column: global row (bits 0-31), thumbnail brightness (32-39)


def _spill_chunk(path: Path, out: Path, first_row: int, buckets: int, settings: DedupSettings) -> np.ndarray:
    """One chunk's band keys written to `out` as uint64 [entries, 3] ordered by bucket (key % buckets): key, the row with
    its thumbnail brightness (see _ROW), the row's phash. Returns where each bucket starts in it, and the end: a bucket
    job reads its slice of every chunk's file, so the shuffle is one file per chunk, not one per chunk and bucket."""
    columns = ["content_sha256", "phash", "thumb"] + (["signature"] if settings.policy == "text_or_image" else [])
    table = pq.read_table(path, columns=columns, use_threads=False)
    if first_row + table.num_rows > 1 << 32:
        raise ValueError(f"dedup takes at most 2**32 rows, got {first_row + table.num_rows}; deduplicate the corpus in parts")
    keys, used, phash_key = _band_keys(table, settings)
    brightness = _thumbs(table).sum(axis=1, dtype=np.uint64) // np.uint64(THUMB * THUMB)  # the mean grey level, floored
    row = np.arange(first_row, first_row + table.num_rows, dtype=np.uint64) | (brightness << np.uint64(32))
    row = np.broadcast_to(row[:, None], keys.shape)
    # the pairs of a key that is not a phash band key pass the bucket's image-hash test: their hashes are written as 0
    phash = np.where(phash_key[None, :], table["phash"].to_numpy()[:, None], np.uint64(0))
    keys = keys[used]
    bucket = (keys % np.uint64(buckets)).astype(np.min_scalar_type(buckets))  # small ints: a radix sort
    order = np.argsort(bucket, kind="stable")
    np.save(out, np.stack([keys[order], row[used][order], phash[used][order]], axis=1))
    return np.r_[0, np.cumsum(np.bincount(bucket, minlength=buckets))].astype(np.int64)


def _candidate_pairs(folder: Path, slices: np.ndarray, settings: DedupSettings) -> np.ndarray:
    """int64 [pairs, 2], each (smaller row, larger row) once: the rows of one bucket (its `slices` of the chunks' keys
    files in `folder`, see _spill_chunk) that share a key, each row paired with up to `max_group_pairs` preceding rows
    of its key group, and kept when the two phashes are within `phash_max_distance` bits (always, for a key that is not
    a phash band key: its entries' phashes are 0). The dHash band-pair keys are ~18 bits, so in a large corpus most rows
    sharing one do so by chance; testing the whole hash here, before any feature is read, keeps the pairs that leave a
    bucket those of near images."""
    keys = _read_rows(_chunk_files(folder, "keys", len(slices)), slices, 3, np.uint64)
    key, row, phash = _sorted_groups(keys.T, settings)
    # each entry's place in its key group, capped where pairing stops
    index = np.arange(len(key))
    place = index - np.maximum.accumulate(np.where(np.r_[True, key[1:] != key[:-1]], index, 0))
    place = np.minimum(place, settings.max_group_pairs).astype(np.min_scalar_type(settings.max_group_pairs))
    reach = np.cumsum(np.bincount(place, minlength=settings.max_group_pairs + 1)[::-1])[::-1]  # entries placed >= step
    pairs, right = [np.zeros((0, 2), np.int64)], None
    # pair each entry with the one `step` before it in its group. While many entries are that far into their group,
    # passes over the whole arrays (no gathers) are the cheaper; past that, only the entries still reaching the step
    # are gathered (they are the only ones that can reach the next), so the work is the entries plus the pairs
    for step in range(1, settings.max_group_pairs + 1):
        if not reach[step]:
            break
        if right is None and reach[step] * 16 < len(place):
            right = np.flatnonzero(place >= step)
        if right is None:
            near = np.bitwise_count(phash[step:] ^ phash[:-step]) <= settings.phash_max_distance
            later = np.flatnonzero(near & (place[step:] >= step)) + step
        else:
            right = right[place[right] >= step]
            later = right[np.bitwise_count(phash[right - step] ^ phash[right]) <= settings.phash_max_distance]
        pairs.append(np.stack([row[later - step] & _ROW, row[later] & _ROW], axis=1).astype(np.int64))
    pairs = np.concatenate(pairs)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]  # one row can hit a group twice only via a band collision
    return _unique_pairs(np.sort(pairs, axis=1))


def _sorted_groups(data: np.ndarray, settings: DedupSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The columns of spilled entries ordered by key, and inside a key group of more than `max_group_pairs` + 1 rows
    (where not every pair is formed) by thumbnail brightness then row, so that copies sit next to each other.

    One flat sort of (the key's top 32 bits, entry number) orders the entries, several times faster than a lexsort on
    three columns; groups whose top bits are shared by two keys, and crowded groups, are then re-sorted exactly."""
    if data.shape[1] >= 1 << 32:
        raise ValueError(f"a dedup bucket holds {data.shape[1]} keys, more than 2**32; lower DedupSettings.bucket_rows")
    if data.shape[1] < 2:
        return data[0], data[1], data[2]
    order = (np.sort((data[0] & ~_ROW) | np.arange(data.shape[1], dtype=np.uint64)) & _ROW).astype(np.int64)
    key, row, phash = data[0][order], data[1][order], data[2][order]
    top = key >> np.uint64(32)
    run_start = np.r_[True, top[1:] != top[:-1]]
    run = np.cumsum(run_start) - 1
    size = np.bincount(run)
    redo = size > settings.max_group_pairs + 1
    redo[run[1:][(key[1:] != key[:-1]) & ~run_start[1:]]] = True
    at = np.flatnonzero(redo[run])
    if len(at):
        exact = at[np.lexsort((row[at], key[at]))]
        key[at], row[at], phash[at] = key[exact], row[exact], phash[exact]
    return key, row, phash


def _unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """np.unique(pairs, axis=0), same order, ~70x faster: one uint64 per pair (rows < 2**32), a flat sort, and
    neighbours compared (np.unique itself took seconds for a few million pairs, a plain sort milliseconds)."""
    packed = np.sort((pairs[:, 0].astype(np.uint64) << np.uint64(32)) | pairs[:, 1].astype(np.uint64))
    packed = packed[np.r_[True, packed[1:] != packed[:-1]]] if len(packed) else packed
    return np.stack([packed >> np.uint64(32), packed & np.uint64(0xFFFFFFFF)], axis=1).astype(np.int64)


def _unique_rows(pairs: np.ndarray) -> np.ndarray:
    """np.unique(pairs), sorted, by a plain sort and a neighbour compare: numpy 2.4's np.unique hashes 1-D input, and
    took most of the clustering's time on the rows of a few million pairs."""
    rows = np.sort(pairs.ravel())
    return rows[np.r_[True, rows[1:] != rows[:-1]]] if len(rows) else rows


def _signatures(table: pa.Table, num_perm: int) -> np.ndarray:
    return table["signature"].combine_chunks().values.to_numpy().reshape(-1, num_perm)


def _thumbs(table: pa.Table) -> np.ndarray:
    thumbs = table["thumb"].combine_chunks()
    if not len(thumbs):
        return np.zeros((0, THUMB * THUMB), np.uint8)
    data = np.frombuffer(thumbs.buffers()[1], dtype=np.uint8)
    return data[thumbs.offset * THUMB * THUMB :][: len(thumbs) * THUMB * THUMB].reshape(-1, THUMB * THUMB)


def _read_rows(files: list[Path], slices: np.ndarray, width: int, dtype: type) -> np.ndarray:
    """Rows a:b of each file's [rows, width] array (as np.save wrote it), one file after another in one array. Plain
    reads, not memory maps: a map of each file kept resident every page the kernel read around the slice, so a job
    reading a slice of many files held far more than the slices."""
    sizes = (slices[:, 1] - slices[:, 0]).clip(0).tolist()
    out = np.empty((sum(sizes), width), dtype)
    at = 0
    for path, (a, _), size in zip(files, slices.tolist(), sizes):
        if size:
            with open(path, "rb") as f:
                major, minor = np.lib.format.read_magic(f)
                getattr(np.lib.format, f"read_array_header_{major}_{minor}")(f)  # past the header, to the first row
                f.seek(f.tell() + a * width * out.itemsize)
                f.readinto(memoryview(out[at : at + size]).cast("B"))
            at += size
    return out


def _read_features(path: Path, rows: np.ndarray, settings: DedupSettings) -> dict:
    """Features of the given rows of one chunk's file, only the columns the policy compares."""
    columns = ["content_sha256", "phash", "thumb"] + ([] if settings.policy == "image" else ["signature"])
    table = pq.read_table(path, columns=columns, use_threads=False).take(pa.array(rows, pa.int64())) if len(rows) else None
    if table is None:
        return {
            "sha": np.zeros((0, 4), np.uint64),
            "phash": np.zeros(0, np.uint64),
            "thumb": np.zeros((0, THUMB * THUMB), np.uint8),
            "signature": None if settings.policy == "image" else np.zeros((0, settings.num_perm), np.uint32),
        }
    sha = np.frombuffer(bytes.fromhex("".join(table["content_sha256"].to_pylist())), dtype=np.uint64)
    return {
        "sha": sha.reshape(-1, 4),
        "phash": table["phash"].to_numpy(),
        "thumb": _thumbs(table),
        "signature": _signatures(table, settings.num_perm) if "signature" in columns else None,
    }


def _packed_width(settings: DedupSettings) -> int:
    return 32 + 8 + THUMB * THUMB + (0 if settings.policy == "image" else 4 * settings.num_perm)


def _pack(f: dict) -> np.ndarray:
    """uint8 [rows, _packed_width]: sha256, phash, thumbnail and signature side by side, so one slice of a file is rows."""
    parts = [f["sha"], f["phash"][:, None], f["thumb"]] + ([] if f["signature"] is None else [f["signature"]])
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8).reshape(len(p), p.shape[1] * p.itemsize) for p in parts], axis=1)


def _unpack(packed: np.ndarray, settings: DedupSettings) -> dict:
    return {
        "sha": packed[:, :32].copy().view(np.uint64),
        "phash": packed[:, 32:40].copy().view(np.uint64)[:, 0],
        "thumb": packed[:, 40 : 40 + THUMB * THUMB],
        "signature": None if settings.policy == "image" else packed[:, 40 + THUMB * THUMB :].copy().view(np.uint32),
    }


def _confirm(f: dict, left: np.ndarray, right: np.ndarray, settings: DedupSettings) -> np.ndarray:
    """Per candidate pair: the index into REASONS of why it is a duplicate under the policy, or -1. The dear
    comparisons (thumbnails, signatures) run only on the pairs the cheap ones leave open."""
    exact = (f["sha"][left] == f["sha"][right]).all(axis=1)
    near = np.bitwise_count(f["phash"][left] ^ f["phash"][right]) <= settings.phash_max_distance
    check = np.flatnonzero(near & ~exact)
    thumb_diff = np.abs(f["thumb"][left[check]].astype(np.int16) - f["thumb"][right[check]]).max(axis=1, initial=0)
    near[check] = thumb_diff <= settings.thumb_max_diff
    image = np.where(exact, 0, np.where(near, 1, -1))
    if settings.policy == "image":
        return image

    def jaccard(rows: np.ndarray | slice) -> np.ndarray:
        # a count, not .mean(): the mean of a bool matrix makes a float64 copy of it, 8 bytes per permutation and pair
        return np.count_nonzero(f["signature"][left[rows]] == f["signature"][right[rows]], axis=1) / settings.num_perm

    if settings.policy == "text_and_image":
        matched = np.flatnonzero(image >= 0)
        reason = np.full(len(left), -1)
        reason[matched] = np.where(jaccard(matched) >= settings.text_threshold, image[matched], -1)
        return reason
    text_alone = (jaccard(slice(None)) >= settings.text_alone_threshold) & ~(f["signature"][left] == _MAX32).all(axis=1)
    return np.where(image >= 0, image, np.where(text_alone, 2, -1))


def _clusters(sample_ids: np.ndarray, left: np.ndarray, right: np.ndarray, reason: np.ndarray, rows: int) -> DedupResult:
    parent = list(range(len(sample_ids)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(left.tolist(), right.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    best = np.full(len(sample_ids), len(REASONS), dtype=np.int64)  # strongest reason over a node's confirmed pairs
    np.minimum.at(best, left, reason)
    np.minimum.at(best, right, reason)
    members: dict[int, list[int]] = {}
    for node in np.flatnonzero(best < len(REASONS)).tolist():
        members.setdefault(find(node), []).append(node)
    groups = sorted((sorted(sample_ids[m].tolist()), m) for m in members.values())
    dup = {"sample_id": [], "duplicate_of": [], "cluster_id": [], "reason": []}
    clu = {"cluster_id": [], "kept_id": [], "dropped_ids": [], "size": [], "reasons": []}
    for cluster_id, (ids, nodes) in enumerate(groups):
        reason_of = {sample_ids[n]: REASONS[best[n]] for n in nodes}
        kept, dropped = ids[0], ids[1:]
        dup["sample_id"] += dropped
        dup["duplicate_of"] += [kept] * len(dropped)
        dup["cluster_id"] += [cluster_id] * len(dropped)
        dup["reason"] += [reason_of[s] for s in dropped]
        clu["cluster_id"].append(cluster_id)
        clu["kept_id"].append(kept)
        clu["dropped_ids"].append(dropped)
        clu["size"].append(len(ids))
        clu["reasons"].append(sorted({reason_of[s] for s in ids}, key=REASONS.index))
    return DedupResult(
        rows=rows,
        duplicates=pa.table(
            dup,
            schema=pa.schema(
                [("sample_id", pa.string()), ("duplicate_of", pa.string()), ("cluster_id", pa.int64()), ("reason", pa.string())]
            ),
        ),
        clusters=pa.table(
            clu,
            schema=pa.schema(
                [
                    ("cluster_id", pa.int64()),
                    ("kept_id", pa.string()),
                    ("dropped_ids", pa.list_(pa.string())),
                    ("size", pa.int64()),
                    ("reasons", pa.list_(pa.string())),
                ]
            ),
        ),
    )
