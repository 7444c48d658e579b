"""Does a per-column reading loss on the vision tower make ordered reading learnable? A CPU-sized beni model (a
conv-stem SigLIP ViT of 4 x 128 at 64 px, pixel-shuffle connector, a 4 x 128 Llama over the 36 glyphs, all from
scratch) learns to answer the string of `--chars` printed characters on an image (bench/glyph_probe.py's images):

- `lm`: the LLM's loss on the answer only, as the recipe trains;
- `ctc`: plus the vision tower's reading loss (`OcrExtension.reading_loss`: CTC from a linear head on the encoder's
  16 columns, read left to right as text recognisers are trained), which ties each character to its place;
- `ctc_frozen_llm`: `ctc` under a frozen LLM, as the recipe's align stage trains: the Llama is first taught to copy
  the glyphs of a context of padding in order (a pretrained LLM's way with text it is shown), then frozen;
- `read_first`: the trainer's encoder stage first (`--read-steps` of the reading loss alone, the LLM not run), then
  `ctc`'s steps;
- `tokens`: `read_first` with the head's transcript handed to the LLM (the ocr extension's `tokens`: the reads as
  soft tokens in the LLM's glyph embeddings, after the image tokens), as the smollm2-siglip recipe trains;
- `tokens_collapsed`: `tokens` with CTC's collapse applied to the soft tokens: a read's character counts only where
  the read before it is not the same character, so a glyph spread over several reads is handed over once;
- `lines_whole` / `lines_banded`: two lines of `--chars` glyphs per image (top and bottom half), answered as one
  string, on `read_first`'s schedule: the head reads the columns of the whole image (as the library's head
  does) against both lines' transcript, or of each line's half against that line's (a reading loss per text line,
  as documents would need); no reading tokens.

    python bench/reading_probe.py --variant ctc && python bench/reading_probe.py --variant lm

Prints one JSON line: the LLM's exact-match accuracy and characters right by position on 200 held-out strings (and,
for `ctc`, the CTC head's own greedy reading); adds it to --out.
"""

import argparse
import io
import json
import multiprocessing
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from glyph_probe import GLYPHS, glyph
from PIL import Image
from pool_probe import pixels as siglip_pixels
from pool_probe import square

from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.ocr.ctc import ctc_loss
from beni_model.ocr.heads import READING_ALPHABET, READS_PER_COLUMN, greedy_transcripts, reading_targets

SIZE, GRID, WIDTH = 64, 16, 128  # image px, patches per side (4 px patches), encoder width
IMAGE_TOKENS = (GRID // 2) ** 2  # after the 2x pixel shuffle
PAD, BOS, EOS, IMG = 0, 1, 2, 3
FIRST_GLYPH = 4  # the glyphs' token ids follow the specials


def glyph_ids(text: str) -> list[int]:
    return [FIRST_GLYPH + GLYPHS.index(c) for c in text]


def render(task: tuple[str, int, int]) -> tuple[str, np.ndarray]:
    seed, chars, lines = task
    if lines == 1:
        text, jpg = glyph(seed, chars)
        return text, square(jpg, SIZE)
    texts, halves = zip(*(glyph(f"{seed}:{i}", chars) for i in range(lines)))
    return "".join(texts), np.concatenate(
        [np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB").resize((SIZE, SIZE // lines))) for jpg in halves]
    )


def band_reading(model: BeniForConditionalGeneration, features: torch.Tensor, lines: int) -> torch.Tensor:
    """The reading head's scores for each line's band of patch rows: [lines, images, reads, classes]."""
    bands = features.reshape(len(features), lines, GRID // lines, GRID, -1)
    return torch.stack([model.extensions["ocr"].reading_head(bands[:, i]) for i in range(lines)]).view(
        lines, len(features), GRID * READS_PER_COLUMN, -1
    )


def build(reading_head: bool, reading_tokens: bool) -> BeniForConditionalGeneration:
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": SIZE,
        "patch_size": SIZE // GRID,
    }
    text = {
        "model_type": "llama",
        "vocab_size": FIRST_GLYPH + len(GLYPHS),
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    config = BeniConfig(
        vision_config=vision,
        text_config=text,
        connector="pixelshuffle2_mlp2x_gelu",
        vision_stem="conv",
        image_token_id=IMG,
        extensions={
            "ocr": {"tokens": reading_tokens, "token_ids": [glyph_ids(c)[0] if c in GLYPHS else PAD for c in READING_ALPHABET + "\n"]}
        }
        if reading_head
        else {},
    )
    torch.manual_seed(0)
    model = BeniForConditionalGeneration(config)
    if reading_tokens:  # as from_parts starts it: the mean character
        model.extensions["ocr"].blank.data = model.get_input_embeddings()(model.extensions["ocr"].token_ids).mean(0).detach()
    return model


def image_embeds(model: BeniForConditionalGeneration, features: torch.Tensor, collapsed: bool) -> torch.Tensor:
    """What the image tokens carry: the connector's tokens, then (with reading_tokens) the head's soft reads."""
    tokens = model.connector(features)
    if not model.config.extensions.get("ocr", {}).get("tokens"):
        return tokens
    ocr = model.extensions["ocr"]
    if not collapsed:
        return torch.cat([tokens, ocr.reading_embeddings(model, features)], 1)
    chars = ocr.reading_scores(model, features).float().softmax(-1)[..., 1:]
    new = chars * (1 - F.pad(chars[:, :-1], (0, 0, 1, 0)))  # a character read again at the next read is CTC's repeat
    probs = torch.cat([1 - new.sum(-1, keepdim=True), new], -1)
    table = torch.cat([ocr.blank[None], model.get_input_embeddings()(ocr.token_ids)])
    return torch.cat([tokens, probs @ table], 1)


def batch(items: list[tuple[str, np.ndarray]], image_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = siglip_pixels(items)
    ids = torch.tensor([[IMG] * image_tokens + [BOS] + glyph_ids(t) + [EOS] for t, _ in items])
    labels = ids.clone()
    labels[:, : image_tokens + 1] = -100
    return pixels, ids, labels


def teach_copying(llm, rng: random.Random, chars: int, steps: int = 800) -> float:
    """Train the LLM alone to answer its context's glyphs in order: PAD everywhere but `chars` random places."""
    optimizer = torch.optim.AdamW(llm.parameters(), lr=2e-3)
    for _ in range(steps):
        texts = ["".join(rng.choices(GLYPHS, k=chars)) for _ in range(64)]
        rows = []
        for text in texts:
            context = [PAD] * IMAGE_TOKENS
            for slot, c in zip(sorted(rng.sample(range(IMAGE_TOKENS), chars)), text):
                context[slot] = glyph_ids(c)[0]
            rows.append(context + [BOS] + glyph_ids(text) + [EOS])
        ids = torch.tensor(rows)
        labels = ids.clone()
        labels[:, : IMAGE_TOKENS + 1] = -100
        loss = F.cross_entropy(llm(input_ids=ids).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variant",
        choices=["lm", "ctc", "ctc_frozen_llm", "read_first", "tokens", "tokens_collapsed", "lines_whole", "lines_banded"],
        required=True,
    )
    parser.add_argument("--chars", type=int, default=4)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--read-steps", type=int, default=400, help="read_first: steps of the reading loss alone, before --steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/out/reading_probe.jsonl")
    args = parser.parse_args()
    lines = 2 if args.variant.startswith("lines") else 1
    length, banded = args.chars * lines, args.variant == "lines_banded"
    with multiprocessing.get_context("spawn").Pool() as pool:
        train = pool.map(render, [(f"train:{i}", args.chars, lines) for i in range(12000)], chunksize=200)
        test = pool.map(render, [(f"test:{i}", args.chars, lines) for i in range(200)], chunksize=50)
    reads = args.variant != "lm"
    model, rng, copy_loss = build(reads, args.variant.startswith("tokens")), random.Random(0), None
    image_tokens, collapsed = model.config.num_image_tokens(), args.variant == "tokens_collapsed"
    if args.variant == "ctc_frozen_llm":
        copy_loss = teach_copying(model.language_model, rng, args.chars)
        model.language_model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    read_steps = args.read_steps if args.variant not in ("lm", "ctc", "ctc_frozen_llm") else 0
    start = time.perf_counter()
    for step in range(1, read_steps + args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1, step / 50)
        items = rng.sample(train, args.batch_size)
        pixels, ids, labels = batch(items, image_tokens)
        features = model.vision_tower(pixels)  # once, for the LLM's image tokens and the reading head alike
        lm = ctc = torch.zeros(())
        if banded:
            parts = [[t[i * args.chars : (i + 1) * args.chars] for t, _ in items] for i in range(lines)]
            ctc = (
                sum(
                    ctc_loss(scores.float().log_softmax(-1), *reading_targets(p))
                    for scores, p in zip(band_reading(model, features, lines), parts)
                )
                / lines
            )
        elif reads:
            ctc = model.extensions["ocr"].reading_loss(model, features, *reading_targets([t for t, _ in items]))
        if step > read_steps:
            embeds = model.get_input_embeddings()(ids).masked_scatter((ids == IMG).unsqueeze(-1), image_embeds(model, features, collapsed))
            logits = model.language_model(inputs_embeds=embeds).logits
            lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        (lm + ctc).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step} lm {lm.item():.3f} ctc {ctc.item():.3f} {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    texts = [t for t, _ in test]
    with torch.no_grad():
        pixels, ids, _ = batch(test, image_tokens)
        features = model.vision_tower(pixels)
        seq, image = ids[:, : image_tokens + 1], image_embeds(model, features, collapsed)
        for _ in range(length):
            embeds = model.get_input_embeddings()(seq).masked_scatter((seq == IMG).unsqueeze(-1), image)
            seq = torch.cat([seq, model.language_model(inputs_embeds=embeds).logits[:, -1].argmax(-1, keepdim=True)], 1)
        answers = ["".join(GLYPHS[i - FIRST_GLYPH] if i >= FIRST_GLYPH else "?" for i in row[image_tokens + 1 :].tolist()) for row in seq]
        head = model.extension_answers(pixels) if reads else None
        if banded:
            head = ["".join(line) for line in zip(*map(greedy_transcripts, band_reading(model, features, lines)))]
    row = {
        "variant": args.variant,
        "chars": args.chars,
        "lines": lines,
        "steps": args.steps,
        "read_steps": read_steps,
        "exact": sum(a == t for a, t in zip(answers, texts)) / len(texts),
        "right_by_position": [round(sum(a[i] == t[i] for a, t in zip(answers, texts)) / len(texts), 3) for i in range(length)],
        "ctc_head_exact": None if head is None else sum(r == t for r, t in zip(head, texts)) / len(texts),
        "copy_loss": copy_loss,  # the frozen LLM's loss on copying, where it was taught to
        "seconds": round(time.perf_counter() - start),
    }
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
