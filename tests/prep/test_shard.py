import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import wids
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from beni_model.data import image_text
from beni_pipeline.prep.dedup import sample_text
from beni_pipeline.prep.shard import (
    ShardSettings,
    batch_order,
    plan_shards,
    read_index,
    verify_shards,
    write_shards,
)

WORDS = "a photo of the word cat dog sign shop open closed red blue green what is written in image answer".split()


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def staged_corpus(root: Path, n: int, chunks: int = 2, seed: int = 0):
    """Staging tars + index.parquet per chunk like the downloader writes them; returns manifest and index."""
    rng = random.Random(seed)
    manifest, index = [], []
    for c in range(chunks):
        chunk = f"chunk-{c:03d}"
        (root / chunk).mkdir(parents=True)
        with tarfile.open(root / chunk / "part-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(c, n, chunks):
                sample_id = hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest()
                side = rng.randint(24, 96)
                image = Image.new("RGB", (side, side), tuple(rng.randint(0, 255) for _ in range(3)))
                out = io.BytesIO()
                image.save(out, "JPEG", quality=90)
                info = tarfile.TarInfo(f"{sample_id}.jpg")
                info.size = len(out.getvalue())
                tar.addfile(info, io.BytesIO(out.getvalue()))
                words = " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))
                if i % 4 == 0:
                    caption, conversations = (
                        "",
                        json.dumps([{"from": "human", "value": "<image>\nwhat is written"}, {"from": "gpt", "value": words}]),
                    )
                else:
                    caption, conversations = words, ""
                manifest.append(
                    {
                        "sample_id": sample_id,
                        "url": f"file:///img/{i}.jpg",
                        "caption": caption,
                        "conversations": conversations,
                        "transcript": words if i % 3 == 0 else None,
                        "lines": json.dumps([[words, 0.5]]) if i % 5 == 0 else None,
                        "source": "test",
                        "row": i,
                        "chunk": chunk,
                    }
                )
                index.append(
                    {
                        "sample_id": sample_id,
                        "status": "ok",
                        "reason": "",
                        "http_status": 200,
                        "bytes": info.size,
                        "width": side,
                        "height": side,
                        "content_sha256": "",
                        "phash": "",
                        "tar": "part-00000.tar",
                        "offset": tar.offset - -(-info.size // 512) * 512,
                        "size": info.size,
                        "ext": "jpg",
                    }
                )
    return pa.Table.from_pylist(manifest), pa.Table.from_pylist(index)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("downloaded")
    manifest, index = staged_corpus(root, 240)
    kept = manifest["sample_id"].slice(0, 200).combine_chunks()  # the rest were "duplicates"
    return root, manifest, index, kept


SETTINGS = ShardSettings(name="train", max_samples=32, max_bytes=96 * 1024, image_tokens=16)


def test_plan_measures_sorts_and_bounds_shards(staged):
    root, manifest, index, kept = staged
    tok = tokenizer()
    plan = plan_shards(manifest, index, kept, tok, SETTINGS)
    assert sorted(plan["sample_id"].to_pylist()) == sorted(kept.to_pylist())
    rows = {r["sample_id"]: r for r in manifest.to_pylist()}
    for sample_id, length in zip(plan["sample_id"].to_pylist(), plan["length"].to_pylist()):
        text = sample_text(rows[sample_id]["caption"], rows[sample_id]["conversations"])
        assert length == len(tok(text, add_special_tokens=False)["input_ids"]) + 16
    lengths = plan["length"].to_numpy()
    assert (np.diff(lengths) >= 0).all() and lengths.min() < lengths.max()
    assert max(np.bincount(plan["shard"].to_numpy())) <= 32


def test_lengths_count_the_text_the_models_extensions_put_after_each_image(staged):
    """With the ocr extension's engine, a sample's lines (else its transcript) follow its image in every prompt, so
    they count in its length; the same plan without it measures the text alone."""
    root, manifest, index, kept = staged
    tok, engine = tokenizer(), {"ocr": {"engine": True}}
    plain = dict(zip(*plan_shards(manifest, index, kept, tok, SETTINGS).select(["sample_id", "length"]).to_pydict().values()))
    read = plan_shards(manifest, index, kept, tok, SETTINGS, partial(image_text, engine))
    rows = {r["sample_id"]: r for r in manifest.to_pylist()}
    grew = 0
    for sample_id, length in zip(read["sample_id"].to_pylist(), read["length"].to_pylist()):
        row = rows[sample_id]
        text = image_text(engine, {"transcript": row["transcript"], "lines": json.loads(row["lines"]) if row["lines"] else None})
        assert length == plain[sample_id] + (len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0)
        grew += length > plain[sample_id]
    assert grew == sum(1 for i in kept.to_pylist() if rows[i]["transcript"] or rows[i]["lines"]) > 0


def test_shards_read_back_with_webdataset_and_wids(staged, tmp_path):
    root, manifest, index, kept = staged
    plan = plan_shards(manifest, index, kept, tokenizer(), SETTINGS)
    built = write_shards(plan, root, tmp_path, SETTINGS)
    assert built == read_index(tmp_path) and verify_shards(tmp_path) == []
    entries = built["shardlist"]
    assert [e["url"] for e in entries] == [f"train-{k:06d}.tar" for k in range(len(entries))]
    assert sum(e["nsamples"] for e in entries) == len(kept) and all(e["bytes"] <= SETTINGS.max_bytes for e in entries)
    assert len(entries) > 200 // 32  # the byte bound split some shards early

    urls = [str(tmp_path / e["url"]) for e in entries]
    seen, by_id = [], {r["sample_id"]: r for r in manifest.to_pylist()}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert sample["__key__"] == meta["sample_id"] and isinstance(sample["jpg"], Image.Image)
        row = by_id[meta["sample_id"]]
        assert meta.get("transcript") == row["transcript"] and meta.get("lines") == (json.loads(row["lines"]) if row["lines"] else None)
        assert (sample["jpg"].width, sample["jpg"].height) == (meta["width"], meta["height"])
        seen.append((meta["sample_id"], meta["length"]))
    assert [s for s, _ in seen] == plan["sample_id"].to_pylist()
    assert [n for _, n in seen] == plan["length"].to_pylist()
    start = 0
    for entry in entries:
        shard_lengths = [n for _, n in seen[start : start + entry["nsamples"]]]
        assert (entry["min_length"], entry["max_length"]) == (min(shard_lengths), max(shard_lengths))
        assert entry["mean_length"] == pytest.approx(np.mean(shard_lengths), abs=1e-3)
        start += entry["nsamples"]

    dataset = wids.ShardListDataset(str(tmp_path / "index.json"), transformations=[])
    assert len(dataset) == len(kept)
    for i in (0, 33, len(kept) - 1):  # random access across shards
        sample = dataset[i]
        assert sample["__key__"] == plan["sample_id"][i].as_py()
        assert json.loads(sample[".json"].read())["length"] == plan["length"][i].as_py()
        assert Image.open(sample[".jpg"]).size[0] > 0
    assert set(pq.read_table(tmp_path / "samples.parquet")["sample_id"].to_pylist()) == set(kept.to_pylist())


def test_same_inputs_give_byte_identical_shards(staged, tmp_path):
    root, manifest, index, kept = staged
    outputs = []
    for run, order in (("a", slice(None)), ("b", slice(None, None, -1))):  # input row order must not matter
        plan = plan_shards(manifest.take(np.arange(manifest.num_rows)[order]), index, kept, tokenizer(), SETTINGS)
        write_shards(plan, root, tmp_path / run, SETTINGS)
        outputs.append(
            {p.name: p.read_bytes() for p in (tmp_path / run).glob("*.tar")} | {"index": (tmp_path / run / "index.json").read_bytes()}
        )
    assert outputs[0] == outputs[1]
    with tarfile.open(next((tmp_path / "a").glob("*.tar"))) as tar:
        member = tar.getmembers()[0]
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")


def test_rerun_after_damage_keeps_good_shards_and_redoes_the_rest(staged, tmp_path):
    root, manifest, index, kept = staged
    plan = plan_shards(manifest, index, kept, tokenizer(), SETTINGS)
    first = write_shards(plan, root, tmp_path, SETTINGS)
    names = [e["url"] for e in first["shardlist"]]
    good = tmp_path / names[0]
    good_inode = good.stat().st_ino
    damaged = tmp_path / names[1]
    damaged.write_bytes(damaged.read_bytes()[:-4096])
    (tmp_path / names[2]).unlink()
    (tmp_path / f".{names[3]}.tmp999").write_bytes(b"half a shard")
    (tmp_path / "train-009999.tar").write_bytes(b"left from a bigger plan")
    (tmp_path / "index.json").unlink()
    again = write_shards(plan, root, tmp_path, SETTINGS)
    assert again == first and verify_shards(tmp_path) == []
    assert good.stat().st_ino == good_inode  # reused, not rewritten
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == names
    assert not list(tmp_path.glob(".*.tmp*"))


def test_killed_writer_leaves_only_complete_shards(staged, tmp_path):
    root, manifest, index, kept = staged
    settings = ShardSettings(name="train", max_samples=4, max_bytes=2**20, image_tokens=16)
    plan = plan_shards(manifest, index, kept, tokenizer(), settings)
    pq.write_table(plan, tmp_path / "plan.parquet")
    script = (
        "import sys, pyarrow.parquet as pq; from pathlib import Path\n"
        "from beni_pipeline.prep.shard import ShardSettings, write_shards\n"
        "write_shards(pq.read_table(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), ShardSettings(name='train', max_samples=4, max_bytes=2**20, image_tokens=16))\n"
    )
    out = tmp_path / "shards"
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "plan.parquet"), str(root), str(out)])
    while not list(out.glob("train-*.tar")) and child.poll() is None:
        time.sleep(0.005)
    child.kill()
    child.wait()
    for shard in out.glob("train-*.tar"):  # whatever is there under the final name is a whole tar
        with tarfile.open(shard) as tar:
            assert len(tar.getmembers()) % 2 == 0 and len(tar.getmembers()) > 0
    index = write_shards(plan, root, out, settings)
    assert index["samples"] == len(kept) and verify_shards(out) == []
    clean = write_shards(plan, root, tmp_path / "clean", settings)
    assert index == clean


def test_batch_order_is_bucketed_shuffled_and_seeded():
    lengths = np.random.default_rng(0).integers(10, 1000, 1000)
    batches = batch_order(lengths, batch_size=8, seed=3, batches_per_bucket=4)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < np.ptp(lengths) / 10  # a batch holds similar lengths
    means = [lengths[b].mean() for b in batches]
    assert not (np.all(np.diff(means) >= 0))  # but batches do not come in length order
    assert all(np.array_equal(a, b) for a, b in zip(batches, batch_order(lengths, 8, seed=3, batches_per_bucket=4)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, batch_order(lengths, 8, seed=4, batches_per_bucket=4)))


def test_bad_inputs_fail_early(staged):
    root, manifest, index, kept = staged
    with pytest.raises(ValueError, match="name"):
        ShardSettings(name="my.shards")
    with pytest.raises(ValueError, match="missing from the manifest"):
        plan_shards(manifest.slice(0, 10), index, kept, tokenizer(), SETTINGS)
    with pytest.raises(ValueError, match="no ok download"):
        plan_shards(manifest, index.slice(0, 10), kept, tokenizer(), SETTINGS)
