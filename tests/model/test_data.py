import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessorPil

from beni_model.chat import IGNORE_INDEX, load_tokenizer
from beni_model.data import (
    DataPosition,
    DataSettings,
    DevicePixels,
    make_loader,
    rank_shards,
    raw_stream,
    reshape_glyphs,
    shard_paths,
    step_modality,
)
from beni_model.ocr.heads import READING_ALPHABET, reading_classes
from beni_model.processing import BeniProcessor

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_toy_shards(
    root: Path, samples: int = 96, per_shard: int = 24, text_every: int = 0, size: int = 32, bare_names: bool = False, lines: bool = False
) -> Path:
    """Shards in the training_shards format for a learnable task: a solid-colour image captioned with its colour
    name (every `text_every`-th sample text-only), every other image with the name as its transcript (and, with
    `bare_names`, as its whole caption; with `lines`, every third image with it as a line at 60% of its height);
    sorted by length, as the real writer does."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    rows = []
    for i in range(samples):
        colour = names[i % len(names)]
        text_only = text_every and i % text_every == 0
        caption = f"a {colour} square" if not text_only else f"the word {colour} repeated: {' '.join([colour] * (i % 5 + 1))}"
        if bare_names and not text_only and i % 2 == 0:
            caption = colour
        rows.append((len(caption) + (0 if text_only else 16), f"s{i:05d}", caption, None if text_only else colour, i % 2 == 0))
    rows.sort()
    entries = []
    for k in range(0, samples, per_shard):
        name = f"train-{k // per_shard:06d}.tar"
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for length, key, caption, colour, transcribed in rows[k : k + per_shard]:
                meta = {"sample_id": key, "caption": caption, "conversations": [], "length": length}
                if colour and transcribed:
                    meta["transcript"] = colour
                if colour and lines and int(key[1:]) % 3 == 0:
                    meta["lines"] = [[colour, 0.6]]
                members = {"json": json.dumps(meta).encode()}
                if colour:
                    out = io.BytesIO()
                    Image.new("RGB", (size + 8, size), COLOURS[colour]).save(out, "JPEG")
                    members["jpg"] = out.getvalue()
                for ext in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(members[ext])
                    tar.addfile(info, io.BytesIO(members[ext]))
        entries.append({"url": name, "nsamples": len(rows[k : k + per_shard])})
    (root / "index.json").write_text(json.dumps({"wids_version": 1, "name": "train", "shardlist": entries}))
    return root


@pytest.fixture
def tokenizer(parts):
    return load_tokenizer(parts["llama"])


@pytest.fixture
def processor(tokenizer):
    return BeniProcessor(SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer, num_image_tokens=16)


def settings(shards: Path, **kw) -> DataSettings:
    return DataSettings(shards=str(shards), batch_size=4, image_size=32, max_length=256, window=2, **kw)


def keys(stream, n):
    return [(pos.step, modality, [s["__key__"] for s in samples]) for (pos, modality, samples), _ in zip(stream, range(n))]


def test_ranks_read_disjoint_shards_in_a_per_epoch_order(tmp_path):
    paths = shard_paths(write_toy_shards(tmp_path, samples=96, per_shard=12))
    epoch0 = [rank_shards(paths, 0, 0, r, 2) for r in range(2)]
    assert sorted(epoch0[0] + epoch0[1]) == sorted(paths) and not set(epoch0[0]) & set(epoch0[1])
    assert rank_shards(paths, 0, 1, 0, 2) != epoch0[0]
    with pytest.raises(ValueError, match="at least one shard per rank"):
        rank_shards(paths[:1], 0, 0, 0, 2)


def test_batches_are_full_cut_from_consecutive_shards_and_every_sample_comes_in_each_epoch(tmp_path):
    shards = write_toy_shards(tmp_path, samples=42, per_shard=7)  # 3 shards of 7 per rank: 5 batches of 4, then 1 + 3
    members = {}
    for path in shard_paths(shards):
        with tarfile.open(path) as tar:
            members[path.name] = {m.name.split(".")[0] for m in tar.getmembers()}
    seen = []
    for rank in range(2):
        order = [p.name for p in rank_shards(shard_paths(shards), 0, 0, rank, 2)]
        batches = [keys_ for _, _, keys_ in keys(raw_stream(settings(shards), rank, 2, DataPosition()), 6)]
        assert [len(b) for b in batches] == [4] * 6
        epoch_order = [
            key
            for _, _, keys_ in keys(raw_stream(dataclasses.replace(settings(shards), window=1), rank, 2, DataPosition()), 6)
            for key in keys_
        ]
        assert batches[-1][1:] == epoch_order[:3]  # the last batch: the epoch's one leftover, then its first samples
        for batch in batches[:-1]:
            used = [order.index(name) for name, m in members.items() if set(batch) & m]
            assert max(used) - min(used) <= 1  # within one shard, or the end of one and the start of the next
        seen += [key for batch in batches[:-1] for key in batch] + batches[-1][:1]
    assert sorted(seen) == sorted(set().union(*members.values()))


def test_every_rank_gets_the_same_modality_each_step(tmp_path):
    shards = write_toy_shards(tmp_path, samples=160, per_shard=20, text_every=3)
    config = settings(shards, text_fraction=0.3)
    streams = [keys(raw_stream(config, rank, 2, DataPosition()), 60) for rank in range(2)]
    modalities = [[m for _, m, _ in s] for s in streams]
    assert modalities[0] == modalities[1] == [step_modality(0, n, 0.3) for n in range(60)]
    assert {"image", "text"} == set(modalities[0])
    with pytest.raises(ValueError, match="no text samples"):
        keys(raw_stream(settings(write_toy_shards(tmp_path / "images_only"), text_fraction=0.5), 0, 1, DataPosition()), 50)


def test_a_stream_resumed_from_its_position_continues_exactly(tmp_path):
    shards = write_toy_shards(tmp_path, samples=64, per_shard=16, text_every=4)
    config = settings(shards, text_fraction=0.25)
    full = keys(raw_stream(config, 1, 2, DataPosition()), 40)  # crosses several epochs
    position = [pos for (pos, _, _), _ in zip(raw_stream(config, 1, 2, DataPosition()), range(23))][-1]
    assert position.epoch > 0
    assert keys(raw_stream(config, 1, 2, position), 17) == full[23:]


def test_loader_workers_decode_in_order_with_padding_labels_and_processed_images(tmp_path, tokenizer, processor):
    shards = write_toy_shards(tmp_path, samples=48, per_shard=24, text_every=5)
    config = settings(shards, text_fraction=0.2)
    expected = keys(raw_stream(config, 0, 1, DataPosition()), 8)
    batches = [b for b, _ in zip(make_loader(config, processor, 0, 1, DataPosition(), workers=2, pin_memory=False), range(8))]
    assert [(b["position"]["step"], b["modality"]) for b in batches] == [(s, m) for s, m, _ in expected]
    for batch, (_, modality, samples) in zip(batches, expected):
        n = len(samples)
        assert batch["input_ids"].shape == batch["labels"].shape and len(batch["input_ids"]) == n
        assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        if modality == "image":
            assert batch["pixel_values"].shape == (n, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8
            assert ((batch["input_ids"] == image_token).sum(dim=1) == 16).all()
        else:
            assert "pixel_values" not in batch and not (batch["input_ids"] == image_token).any()
    stored = next(b for b in batches if b["modality"] == "image")["pixel_values"]
    solid = DevicePixels(processor.image_processor, torch.device("cpu"))(stored)[0]  # SigLIP's processor: (x / 255 - 0.5) / 0.5
    assert solid.min() >= -1 and solid.max() <= 1 and solid.std() > 0
    assert torch.allclose(solid.mean(dim=(1, 2)), solid[:, 0, 0], atol=0.05)  # a solid colour survives the resize


def test_device_pixels_finish_images_as_the_processor_does(tmp_path, processor):
    images = [Image.effect_mandelbrot((40, 30), (-2, -1.5, 1, 1.5), 50).convert("RGB"), Image.new("RGB", (20, 50), (200, 30, 90))]
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    stored = processor.image_processor(images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    assert stored.dtype == torch.uint8
    torch.testing.assert_close(DevicePixels(processor.image_processor, torch.device("cpu"))(stored), expected, rtol=0, atol=1e-6)


def test_packed_batches_hold_the_same_samples_in_fewer_rows_and_cells(tmp_path, processor):
    shards = write_toy_shards(tmp_path, samples=48, per_shard=24, text_every=5)
    loaders = [
        make_loader(settings(shards, text_fraction=0.2, pack=pack), processor, 0, 1, DataPosition(), 0, False) for pack in (False, True)
    ]
    plain, packed = ([b for b, _ in zip(loader, range(8))] for loader in loaders)
    assert sum(len(b["input_ids"]) for b in packed) < sum(len(a["input_ids"]) for a in plain)
    for a, b in zip(plain, packed):
        assert (a["position"], a["modality"]) == (b["position"], b["modality"]) and "position_ids" in b
        assert b["input_ids"].numel() <= a["input_ids"].numel() and b["input_ids"].shape[1] <= 256
        assert torch.equal(a["input_ids"][a["attention_mask"].bool()], b["input_ids"][b["attention_mask"].bool()])
        if a["modality"] == "image":
            assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_image_batches_carry_the_transcripts_classes_for_the_reading_head(tmp_path, processor):
    shards = write_toy_shards(tmp_path, samples=48, per_shard=24)
    config = settings(shards)
    assert "reading_lengths" not in next(iter(make_loader(config, processor, 0, 1, DataPosition(), 0, False)))
    config = settings(shards, extensions={"ocr": {}}, targets=("ocr",), grid=4)
    expected = keys(raw_stream(config, 0, 1, DataPosition()), 12)  # one epoch
    batches = [b for b, _ in zip(make_loader(config, processor, 0, 1, DataPosition(), 0, False), range(12))]
    transcripts = {f"s{i:05d}": colour for i, colour in enumerate(list(COLOURS) * 12) if i % 2 == 0}
    for batch, (_, _, samples) in zip(batches, expected):
        lines = [transcripts.get(key) for key in samples]
        assert batch["reading_lengths"].tolist() == [len(line) if line else -1 for line in lines]  # -1: no transcript
        classes = [reading_classes(line) or [] for line in lines]
        assert [row[: len(ids)] for row, ids in zip(batch["reading_targets"].tolist(), classes)] == classes
        assert batch["reading_targets"].shape[1] == max(map(len, classes)) and batch["reading_targets"].sum() == sum(map(sum, classes))
    assert 0 < sum(int((b["reading_lengths"] > 0).sum()) for b in batches) < sum(len(b["reading_lengths"]) for b in batches)


def test_replies_that_are_the_transcript_are_spelled_when_asked(tmp_path, tokenizer, processor):
    shards = write_toy_shards(tmp_path, samples=48, per_shard=24, bare_names=True)
    whole, spelled = (
        [
            b
            for b, _ in zip(
                make_loader(settings(shards, extensions={"ocr": {"tokens": spell}}), processor, 0, 1, DataPosition(), 0, False), range(12)
            )
        ]
        for spell in (False, True)
    )
    characters = {colour: [tokenizer.encode(c, add_special_tokens=False)[0] for c in colour] for colour in COLOURS}
    seen = 0
    for a, b in zip(whole, spelled):
        for row_a, row_b, labels_a, labels_b in zip(a["input_ids"], b["input_ids"], a["labels"], b["labels"]):
            text = tokenizer.decode(row_a[labels_a != IGNORE_INDEX])
            assert tokenizer.decode(row_b[labels_b != IGNORE_INDEX]) == text
            trained = labels_b[labels_b != IGNORE_INDEX].tolist()
            colour = text.removesuffix("<|im_end|>\n")
            if colour in COLOURS:
                assert trained[: len(colour)] == characters[colour]
                seen += 1
            else:
                assert trained == labels_a[labels_a != IGNORE_INDEX].tolist()
    assert seen == 24  # every transcribed image of the epoch


def test_documents_lines_reach_the_batch_as_one_target_per_row(tmp_path, processor):
    shards = write_toy_shards(tmp_path, samples=48, per_shard=24, lines=True)
    batches = [
        b
        for b, _ in zip(
            make_loader(
                settings(shards, extensions={"ocr": {"lines": True}}, targets=("ocr",), grid=4), processor, 0, 1, DataPosition(), 0, False
            ),
            range(12),
        )
    ]
    documents = 0
    for batch in batches:
        lengths, targets = batch["line_lengths"], batch["line_targets"]
        assert lengths.shape == (len(batch["pixel_values"]), 4) == targets.shape[:2]
        for rows, target in zip(lengths.tolist(), targets):
            if rows == [-1] * 4:
                continue
            documents += 1
            assert rows[:2] + rows[3:] == [0, 0, 0]  # the line's centre lies in row 2 of 4; the other rows read nothing
            assert "".join(READING_ALPHABET[k - 1] for k in target[2, : rows[2]].tolist()) in COLOURS
    assert documents == 16  # every third image of the epoch


def test_augmented_images_are_new_pixels_per_step_and_the_same_for_the_same_step(processor):
    stored = torch.stack([torch.full((3, 32, 32), v, dtype=torch.uint8) for v in (0, 90, 180, 255)] * 8)
    stored[:, :, 12:20, 4:28] = 255 - stored[:, :, 12:20, 4:28]  # a bar of "ink" on each
    plain = DevicePixels(processor.image_processor, torch.device("cpu"))
    augmented = DevicePixels(processor.image_processor, torch.device("cpu"), augment=["camera"], seed=3)
    steps = {step: augmented(stored, rank=0, step=step) for step in (1, 2)}
    assert steps[1].shape == stored.shape and steps[1].dtype == torch.float32
    assert steps[1].min() >= -1 and steps[1].max() <= 1
    changed = [not torch.allclose(a, b) for a, b in zip(plain(stored), steps[1])]
    assert len(stored) // 2 < sum(changed) < len(stored)  # each change is drawn per image, most images get one
    assert not torch.allclose(steps[1], steps[2])  # every epoch reads new pixels
    torch.testing.assert_close(augmented(stored, rank=0, step=1), steps[1], rtol=0, atol=0)  # a resumed run reads the same
    assert not torch.allclose(augmented(stored, rank=1, step=1), steps[1])
    ink = (steps[1][:, :, 12:20, 4:28].mean(dim=(1, 2, 3)) - steps[1][:, :, :8].mean(dim=(1, 2, 3))).abs()
    assert (ink > 0.1).float().mean() > 0.9  # the text stays readable: its bar still stands out from the background


def test_glyph_augmentation_reshapes_the_ink_but_keeps_it_in_the_frame_and_on_its_rows():
    images = torch.ones(32, 3, 64, 64)
    images[:, :, 24:40, :] = 0  # a line of "ink" across the whole width
    images[:, :, 26:38, 8:56:6] = 1  # with gaps, so there are strokes to slant and thicken
    generator = torch.Generator().manual_seed(0)
    reshaped = reshape_glyphs(images, generator)
    assert reshaped.shape == images.shape and reshaped.min() >= 0 and reshaped.max() <= 1
    ink = (1 - reshaped).mean(1)
    assert ink[:, :20].max() < 0.05 and ink[:, 44:].max() < 0.05  # nothing moved to other rows
    kept = ink.sum((1, 2)) / (1 - images).mean(1).sum((1, 2))
    assert kept.min() > 0.5  # nothing left the frame (strokes a pixel lighter at most)
    assert len({round(float(d), 3) for d in (reshaped - images).abs().mean((1, 2, 3))}) > 16  # shapes drawn per image
    torch.testing.assert_close(reshape_glyphs(images, torch.Generator().manual_seed(0)), reshaped, rtol=0, atol=0)


def test_augment_names_what_it_draws(processor):
    with pytest.raises(ValueError, match="Unknown augmentation"):
        DevicePixels(processor.image_processor, torch.device("cpu"), augment=["colour"])
