import hashlib
import io
import itertools
import json
import multiprocessing
import random
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash, MinHashLSH
from PIL import Image, ImageDraw, ImageFont

from beni_pipeline.prep import dedup
from beni_pipeline.prep.dedup import (
    THUMB,
    DedupSettings,
    cached_features,
    find_duplicates,
    find_duplicates_parallel,
    kept_ids,
    lean_minhash,
    lsh_candidate_probability,
    minhash_signatures,
    shingles,
    write_chunk_features,
    write_result,
)
from beni_pipeline.prep.images import dhash as phash
from beni_pipeline.prep.images import process_image

COLOURS = ["red", "blue", "green", "black", "purple", "orange"]


def render(word: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (rng.randint(300, 640), rng.randint(200, 480)), tuple(rng.randint(150, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    ink = tuple(rng.randint(0, 100) for _ in range(3))
    draw.text((rng.randint(5, 100), rng.randint(5, 100)), word, fill=ink, font=ImageFont.load_default(size=rng.randint(24, 64)))
    for _ in range(3):
        draw.line([(rng.randint(0, 600), rng.randint(0, 480)) for _ in range(2)], fill=ink, width=2)
    return image


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_chunk(chunk_dir: Path, samples: list[dict]) -> pa.Table:
    """Staging tar + index.parquet like the downloader writes; returns the chunk's manifest rows.
    Each sample: sample_id, data (downloaded bytes), caption, conversations."""
    chunk_dir.mkdir(parents=True)
    index = []
    with tarfile.open(chunk_dir / "part-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            image = process_image(
                s["data"], resize_mode="longest_edge", image_size=512, image_format="jpg", quality=90, min_side=16, max_pixels=64_000_000
            )
            info = tarfile.TarInfo(f"{s['sample_id']}.jpg")
            info.size = len(image.data)
            tar.addfile(info, io.BytesIO(image.data))
            offset = tar.offset - -(-info.size // 512) * 512
            index.append(
                {
                    "sample_id": s["sample_id"],
                    "status": "ok",
                    "reason": "",
                    "http_status": 200,
                    "bytes": len(s["data"]),
                    "width": image.width,
                    "height": image.height,
                    "content_sha256": image.content_sha256,
                    "phash": image.phash,
                    "tar": "part-00000.tar",
                    "offset": offset,
                    "size": info.size,
                    "ext": "jpg",
                }
            )
    index.append(
        {
            "sample_id": "f" * 16,
            "status": "failed",
            "reason": "http_404",
            "http_status": 404,
            "bytes": 0,
            "width": 0,
            "height": 0,
            "content_sha256": "",
            "phash": "",
            "tar": "",
            "offset": -1,
            "size": 0,
            "ext": "",
        }
    )
    pq.write_table(pa.Table.from_pylist(index), chunk_dir / "index.parquet")
    return pa.Table.from_pylist(
        [
            {
                "sample_id": s["sample_id"],
                "url": "",
                "caption": s["caption"],
                "conversations": s["conversations"],
                "source": "test",
                "row": i,
                "chunk": chunk_dir.name,
            }
            for i, s in enumerate(samples)
        ]
        + [{"sample_id": "f" * 16, "url": "", "caption": "x", "conversations": "", "source": "test", "row": -1, "chunk": chunk_dir.name}]
    )


def sid(n: int) -> str:
    return hashlib.blake2b(str(n).encode(), digest_size=8).hexdigest()


def planted_corpus(n_base: int = 160, seed: int = 0):
    """Distinct renders with templated captions, plus planted copies (resized + re-encoded, caption identical
    or lightly edited), exact byte copies, generic-caption distinct images and one image with two questions.
    Returns samples and the true duplicate groups (lists of sample ids)."""
    rng = random.Random(seed)
    samples, groups = [], []
    for n in range(n_base):
        word = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 9)))
        image = render(word, seed * 100_000 + n)
        caption = f"a photo of the word {word} written in {rng.choice(COLOURS)}"
        samples.append({"sample_id": sid(n), "data": jpeg(image), "caption": caption, "conversations": ""})
        group = [sid(n)]
        if n % 3 == 0:  # a planted near-duplicate
            scale = rng.uniform(0.4, 0.9)
            copy = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
            edit = rng.choice([caption, caption.upper() + ".", caption.replace("photo", "picture"), caption + " clearly"])
            samples.append({"sample_id": sid(10_000 + n), "data": jpeg(copy, rng.randint(40, 85)), "caption": edit, "conversations": ""})
            group.append(sid(10_000 + n))
        if n % 10 == 0:  # the same downloaded bytes again
            samples.append({"sample_id": sid(20_000 + n), "data": samples[-len(group)]["data"], "caption": caption, "conversations": ""})
            group.append(sid(20_000 + n))
        if len(group) > 1:
            groups.append(group)
    for n in range(40):  # distinct images that share a generic caption: never duplicates by default
        samples.append(
            {"sample_id": sid(30_000 + n), "data": jpeg(render(f"sign {n}", 7_000 + n)), "caption": "a photo", "conversations": ""}
        )
    same = jpeg(render("invoice", 99))  # one image, two different questions: two samples to keep
    for n, question in enumerate(["What is written in the image?", "Which colour is the background of this picture?"]):
        turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": f"answer number {n}"}]
        samples.append({"sample_id": sid(40_000 + n), "data": same, "caption": "", "conversations": json.dumps(turns)})
    return samples, groups


def pairs_of(groups) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("downloaded")
    samples, groups = planted_corpus()
    random.Random(1).shuffle(samples)
    half = len(samples) // 2
    manifests = {"c0": write_chunk(root / "c0", samples[:half]), "c1": write_chunk(root / "c1", samples[half:])}
    return root, manifests, samples, groups


def features(corpus, out: Path, settings: DedupSettings) -> list[Path]:
    root, manifests, _, _ = corpus
    return [write_chunk_features(m, root / chunk, out / f"{chunk}.parquet", settings) for chunk, m in manifests.items()]


def test_signatures_equal_datasketch_minhash():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)] + ["Ünïcode", "naïve"]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(0, 25))) for _ in range(200)] + ["", "one", "two words"]
    for ngram in (1, 3):
        signatures = minhash_signatures(texts, num_perm=64, ngram=ngram, seed=7)
        for text, signature in zip(texts, signatures):
            reference = MinHash(num_perm=64, seed=7, hashfunc=zlib.crc32)
            for shingle in shingles(text, ngram):
                reference.update(shingle)
            assert np.array_equal(signature, reference.hashvalues)
    lsh = MinHashLSH(threshold=0.5, num_perm=64)
    lsh.insert("first", lean_minhash(signatures[0], seed=7))
    assert lsh.query(lean_minhash(signatures[0], seed=7)) == ["first"]


def test_shingles():
    assert shingles("A photo, of THE cat!", 3) == [b"a photo of", b"photo of the", b"of the cat"]
    assert shingles("a photo", 3) == [b"a photo"]
    assert shingles(" ... ", 2) == []


def test_phash_is_the_dhash_of_the_stored_image():
    image = render("hello", 1)
    stored = process_image(
        jpeg(image), resize_mode="longest_edge", image_size=512, image_format="jpg", quality=90, min_side=16, max_pixels=64_000_000
    )
    assert phash(Image.open(io.BytesIO(stored.data))) == stored.phash
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = "".join("1" if b else "0" for b in (grey[:, :-1] > grey[:, 1:]).ravel())
    assert phash(image) == f"{int(bits, 2):016x}"


def test_planted_duplicates_precision_and_recall(corpus, tmp_path):
    _, _, samples, groups = corpus
    result = find_duplicates(features(corpus, tmp_path, DedupSettings()), DedupSettings(), work_dir=tmp_path)
    found = pairs_of([[c["kept_id"], *c["dropped_ids"]] for c in result.clusters.to_pylist()])
    truth = pairs_of(groups)
    precision, recall = len(found & truth) / max(1, len(found)), len(found & truth) / len(truth)
    assert precision >= 0.99 and recall >= 0.95, (precision, recall)
    dropped = set(result.duplicates["sample_id"].to_pylist())
    assert not dropped & {sid(30_000 + n) for n in range(40)}  # generic captions, distinct images
    assert not dropped & {sid(40_000), sid(40_001)}  # one image, different questions
    assert result.rows == len(samples)  # the failed download is not a dedup row
    assert all(c["kept_id"] == min([c["kept_id"], *c["dropped_ids"]]) for c in result.clusters.to_pylist())
    assert "image-exact" in result.duplicates["reason"].to_pylist()
    stats = result.stats()
    assert stats["kept"] + stats["dropped"] == len(samples) and stats["dropped"] == len(dropped)


def test_policies_trade_safety_for_reach(corpus, tmp_path):
    generic = {sid(30_000 + n) for n in range(40)}
    questions = {sid(40_000), sid(40_001)}
    for policy, drops_generic, drops_questions in (("text_or_image", True, True), ("image", False, True)):
        settings = DedupSettings(policy=policy)
        result = find_duplicates(features(corpus, tmp_path / policy, settings), settings)
        dropped = set(result.duplicates["sample_id"].to_pylist())
        assert bool(dropped & generic) == drops_generic and bool(dropped & questions) == drops_questions, policy
        reasons = set(result.duplicates["reason"].to_pylist())
        assert ("text" in reasons) == (policy == "text_or_image")


def test_deterministic_across_buckets_and_chunk_order(corpus, tmp_path):
    paths = features(corpus, tmp_path, DedupSettings())
    one = find_duplicates(paths, DedupSettings(buckets=1))
    other = find_duplicates(list(reversed(paths)), DedupSettings(buckets=5))
    assert DedupSettings(bucket_rows=50).bucket_count(one.rows) == -(-one.rows // 50) and DedupSettings(buckets=5).bucket_count(10**9) == 5
    by_rows = find_duplicates(paths, DedupSettings(bucket_rows=50))
    assert one.clusters.equals(by_rows.clusters) and one.duplicates.equals(by_rows.duplicates)
    assert one.duplicates.equals(other.duplicates) and one.clusters.equals(other.clusters)
    assert [DedupSettings().key_bands(rows) for rows in (one.rows, 17_000_000, 17_100_000, 10**9, 2 * 10**9)] == [2, 2, 3, 3, 4]
    assert DedupSettings(max_group_pairs=1).key_bands(10**9) == 4 and DedupSettings(phash_key_bands=3).key_bands(10) == 3
    triples = find_duplicates(paths, DedupSettings(phash_key_bands=3))  # other keys, the same pairs within the distance
    assert one.duplicates.equals(triples.duplicates) and one.clusters.equals(triples.clusters)
    write_result(one, tmp_path / "out")
    assert pq.read_table(tmp_path / "out" / "clusters.parquet").equals(one.clusters)
    kept = set(kept_ids(paths[0], one).to_pylist()) | set(kept_ids(paths[1], one).to_pylist())
    assert len(kept) == one.rows - one.duplicates.num_rows
    assert not kept & set(one.duplicates["sample_id"].to_pylist())


def test_the_parallel_path_finds_the_same_clusters_as_one_process(corpus, tmp_path, monkeypatch):
    """Jobs per chunk, per bucket and per confirmation group, run in two other processes (as the cluster engine runs
    them), against one bucket and one group in this process, on each policy. Sparse candidate pairs (image keys) are
    confirmed in groups of `_CONFIRM_PAIRS`; dense ones (text alone: most pairs of rows sharing words) in one group,
    so that no row's features are read by most groups."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        for policy, sparse in (("text_and_image", True), ("text_or_image", False)):
            paths = features(corpus, tmp_path / policy, DedupSettings(policy=policy))
            one = find_duplicates(paths, DedupSettings(policy=policy, buckets=1))
            monkeypatch.setattr(dedup, "_CONFIRM_PAIRS", 16)  # several groups, each reading a slice of every chunk's rows
            settings = DedupSettings(policy=policy, bucket_rows=100)
            calls = []
            parallel = find_duplicates_parallel(
                paths, settings, work_dir=tmp_path, map_=lambda f, *a: calls.append((a[0][0].__name__, a[1:])) or pool.map(f, *a)
            )
            monkeypatch.undo()
            groups = -(-one.candidate_pairs // 16) if sparse else 1
            assert one.clusters.num_rows > 10 and one.candidate_pairs > 2 * 16, (one.clusters.num_rows, one.candidate_pairs)
            jobs = [(name, len(args[0])) for name, args in calls]
            assert jobs == [("_spill_chunk", 2), ("_candidate_pairs", 3), ("_write_rows", 2), ("_confirm_group", groups)], jobs
            rows = calls[3][1][1]  # each group's candidate rows: every one of them read from the files once per group
            assert sum(map(len, rows)) <= 2 * len(np.unique(np.concatenate(rows))), policy
            assert parallel.rows == one.rows and parallel.duplicates.equals(one.duplicates), policy
            assert parallel.clusters.equals(one.clusters), policy
            workers = set(parallel.peak_rss_mib) - {"this process"}
            assert len(workers) == 2 and all(parallel.peak_rss_mib[w] > 10 for w in workers), parallel.peak_rss_mib


def test_features_cache_follows_index_and_settings(corpus, tmp_path):
    root, manifests, _, _ = corpus
    out = tmp_path / "c0.parquet"
    assert not cached_features(out, root / "c0")
    write_chunk_features(manifests["c0"], root / "c0", out)
    assert cached_features(out, root / "c0")
    assert not cached_features(out, root / "c0", DedupSettings(ngram=2))
    assert not cached_features(out, root / "c1")  # another index: another download of the chunk


def synthetic_features(path: Path, texts: list[str], phashes: list[int], shas: list[str], thumbs: list[bytes], settings: DedupSettings):
    signatures = minhash_signatures(texts, settings.num_perm, settings.ngram, settings.seed)
    pq.write_table(
        pa.table(
            {
                "sample_id": [sid(i) for i in range(len(texts))],
                "content_sha256": shas,
                "phash": pa.array(phashes, pa.uint64()),
                "thumb": pa.array(thumbs, pa.binary(THUMB * THUMB)),
                "signature": pa.FixedSizeListArray.from_arrays(pa.array(signatures.ravel()), settings.num_perm),
            }
        ),
        path,
    )
    return path


def test_lsh_bands_find_jaccard_08_pairs(tmp_path):
    """Text-only matching: 21 x 6 bands find >= 95% of J = 0.8 pairs; datasketch's own pick for threshold 0.8
    (9 x 13) misses many; J = 0.2 pairs are never merged."""
    rng = np.random.default_rng(0)
    texts = []
    for p in range(150):
        words = [f"p{p}w{i}" for i in range(50)]
        texts += [" ".join(words[:45]), " ".join(words[:40] + words[45:])]  # 40 shared of 50: J = 0.8
    for p in range(50):
        words = [f"q{p}w{i}" for i in range(50)]
        texts += [" ".join(words[:30]), " ".join(words[:10] + words[30:])]  # 10 shared of 50: J = 0.2
    n = len(texts)
    high = pairs_of([[sid(2 * p), sid(2 * p + 1)] for p in range(150)])
    recall = {}
    for bands, rows in ((21, 6), (9, 13)):
        settings = DedupSettings(policy="text_or_image", text_alone_threshold=0.7, lsh_bands=bands, lsh_rows=rows)
        path = synthetic_features(
            tmp_path / f"{bands}.parquet",
            texts,
            rng.integers(0, 2**63, n).tolist(),
            [f"{i:064x}" for i in range(n)],
            [rng.bytes(THUMB * THUMB) for _ in range(n)],
            settings,
        )
        result = find_duplicates([path], settings)
        found = pairs_of([[c["kept_id"], *c["dropped_ids"]] for c in result.clusters.to_pylist()])
        assert found <= high
        recall[bands] = len(found & high) / len(high)
    assert recall[21] >= 0.95 and recall[9] < 0.75, recall
    assert lsh_candidate_probability(0.8, 21, 6) > 0.99 and lsh_candidate_probability(0.8, 9, 13) < 0.5


def test_large_exact_group_is_one_cluster_with_bounded_pairs(tmp_path):
    settings = DedupSettings(max_group_pairs=3)
    n = 150
    thumb = bytes(THUMB * THUMB)
    path = synthetic_features(tmp_path / "f.parquet", ["a photo"] * n, [0] * n, ["ab" * 32] * n, [thumb] * n, settings)
    result = find_duplicates([path], settings)
    assert result.clusters.num_rows == 1 and result.clusters["size"][0].as_py() == n
    assert result.clusters["kept_id"][0].as_py() == min(sid(i) for i in range(n))


def test_candidate_pairs_grow_with_the_copies_not_the_square_of_the_rows(tmp_path):
    """Unrelated rows share one of 21 ~18-bit dHash band-pair keys by chance ~21 rows^2 / 2^19 times (about 4k
    pairs at 10k rows, 64k at 40k); those pairs must not reach the feature comparison, while every planted copy does."""
    settings = DedupSettings()
    rng = np.random.default_rng(0)
    for n in (10_000, 40_000):
        copies = n // 200
        texts = [" ".join(f"r{i}w{k}" for k in range(8)) for i in range(n)]
        phashes = rng.integers(0, 2**63, n, dtype=np.uint64)
        thumbs = rng.integers(0, 256, (n, THUMB * THUMB), dtype=np.uint8)
        for c in range(copies):  # row n - 1 - c: a copy of row c, its image's dHash two bits off
            texts[n - 1 - c], thumbs[n - 1 - c] = texts[c], thumbs[c]
            phashes[n - 1 - c] = phashes[c] ^ np.uint64(0b101 << (c % 60))
        shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
        path = synthetic_features(tmp_path / f"{n}.parquet", texts, phashes.tolist(), shas, [t.tobytes() for t in thumbs], settings)
        result = find_duplicates([path], settings, work_dir=tmp_path)
        assert result.duplicates.num_rows == copies
        assert copies <= result.candidate_pairs <= copies + n // 1000, (n, result.candidate_pairs)


def test_settings_fail_early_with_one_sentence():
    with pytest.raises(ValueError, match="policy"):
        DedupSettings(policy="text")
    with pytest.raises(ValueError, match="phash_key_bands"):
        DedupSettings(phash_key_bands=5)
    with pytest.raises(ValueError, match="bucket_rows"):
        DedupSettings(bucket_rows=0)
    with pytest.raises(ValueError, match="lsh_bands x lsh_rows"):
        DedupSettings(lsh_bands=20, lsh_rows=8)
