"""How fast does the reading head learn on the corpus's own one-line images, pooling each column of the patch grid
by attention (the library's `ocr.heads.ReadingHead`) or by its mean (the pool held at zero)? The trainer's encoder stage
at CPU size: a conv-stem SigLIP ViT of 4 x 128 at 128 px (16 x 16 patches of 8 px, 32 reads), the reading loss
alone, AdamW at 1e-3 with warmup and cosine, on the transcribed samples of `synthetic.make_sample` (words, digit and
random strings, sentences, handwriting, curved and artistic text) that fit the reads, 300 held out from another seed.

    python bench/pool_probe.py --pool attention && python bench/pool_probe.py --pool mean

Prints one JSON line (reading loss by tenth, the head's exact reading on the held-out lines, overall and by kind)
and adds it to --out.
"""

import argparse
import io
import json
import math
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import SiglipImageProcessorPil

from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.ocr.heads import READS_PER_COLUMN, reading_classes, reading_targets
from beni_pipeline.prep import synthetic as syn

SIZE, PATCH = 128, 8
READS = SIZE // PATCH * READS_PER_COLUMN
VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": SIZE,
    "patch_size": PATCH,
}
TEXT = {
    "model_type": "llama",
    "vocab_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}  # unused: the encoder stage never runs the LLM


def render(task: tuple[int, int]) -> tuple[str, str, np.ndarray] | None:
    sample = syn.make_sample(*task)
    text = sample.transcript
    if not text or not reading_classes(text) or len(text) > READS // 2:  # CTC needs room for blanks between repeats
        return None
    return sample.kind, text, square(syn.jpeg(sample.image))


def lines(seed: int, count: int, pool) -> list[tuple[str, str, np.ndarray]]:
    return [r for r in pool.imap(render, [(seed, i) for i in range(count)], chunksize=100) if r is not None]


def corpus_lines(samples: int, cache: Path) -> tuple[list, list]:
    """The training and held-out lines, rendered once and kept in `cache` (an .npz) for the other variant's run."""
    if cache.is_file() and int((data := np.load(cache))["samples"]) == samples:
        return tuple(
            [(str(k), str(t), im) for k, t, im in zip(data[f"{s}_kinds"], data[f"{s}_texts"], data[f"{s}_images"])]
            for s in ("train", "test")
        )
    with multiprocessing.get_context("spawn").Pool() as pool:
        train, test = lines(0, samples, pool), lines(1, 500, pool)[:300]
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"{s}_{f}": np.stack([row[i] for row in part])
        for s, part in (("train", train), ("test", test))
        for i, f in enumerate(("kinds", "texts", "images"))
    }
    partial = cache.with_suffix(".partial.npz")  # the other variant's run may be waiting for the file
    np.savez(partial, samples=samples, **arrays)
    partial.replace(cache)
    return train, test


def square(jpg: bytes, size: int = SIZE) -> np.ndarray:
    """[size, size, 3] uint8, resized as SigLIP's image processor resizes (cached as uint8: a quarter of the bytes)."""
    with Image.open(io.BytesIO(jpg)) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def pixels(items) -> torch.Tensor:
    """SigLIP's image processor on the cached squares (its resize is then a no-op)."""
    size = items[0][-1].shape[0]
    processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    return processor([im for *_, im in items], return_tensors="pt")["pixel_values"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", choices=["attention", "mean"], required=True)
    parser.add_argument(
        "--samples", type=int, default=16000, help="corpus samples drawn for training (about 60%% are transcribed lines that fit)"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/out/pool_probe.jsonl")
    parser.add_argument("--cache", type=Path, default=Path("bench/out/pool_probe_lines.npz"))
    args = parser.parse_args()
    train, test = corpus_lines(args.samples, args.cache)
    config = BeniConfig(vision_config=VISION, text_config=TEXT, vision_stem="conv", extensions={"ocr": {}}, image_token_id=7)
    torch.manual_seed(0)
    model = BeniForConditionalGeneration(config)
    tower, ocr = model.vision_tower, model.extensions["ocr"]
    if args.pool == "mean":
        ocr.reading_head.pool.requires_grad_(False)  # zero scores: every row weighs the same
    params = [p for p in [*tower.parameters(), *ocr.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng, losses, start = np.random.default_rng(0), [], time.perf_counter()
    for step in range(1, args.steps + 1):
        warmup = min(100, args.steps // 10)
        progress = max(0, step - warmup) / max(1, args.steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1, step / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        items = [train[i] for i in rng.choice(len(train), args.batch_size, replace=False)]
        loss = ocr.reading_loss(model, tower(pixels(items)), *reading_targets([t for _, t, _ in items]))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step} reading loss {np.mean(losses[-100:]):.3f} {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    with torch.no_grad():
        reads = [r for i in range(0, len(test), 100) for r in model.extension_answers(pixels(test[i : i + 100]))]
    right, seen = Counter(), Counter()
    for (kind, text, _), read in zip(test, reads):
        seen[kind] += 1
        right[kind] += read == text
    tenth = args.steps // 10
    row = {
        "pool": args.pool,
        "steps": args.steps,
        "train_lines": len(train),
        "reading_loss_by_tenth": [round(float(np.mean(losses[i : i + tenth])), 2) for i in range(0, args.steps, tenth)],
        "head_exact": round(sum(right.values()) / len(test), 3),
        "head_exact_by_kind": {k: f"{right[k]}/{seen[k]}" for k in sorted(seen)},
        "examples": [f"{t} -> {r}" for (_, t, _), r in list(zip(test, reads))[:8]],
        "seconds": round(time.perf_counter() - start),
    }
    print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
