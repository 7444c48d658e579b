"""Would a conv stem that learned from real text carry a reader to glyphs it never saw? A small reader (a conv stem to
stride 4, a 2x2 patchify to stride 8, two transformer layers of 128 over the patch grid, each column pooled over the
rows by attention and read by a CTC head: the shape of the recipe's tower and reading head, at probe size) learns the
corpus's handwriting as font_probe writes it (`synthetic.ink_line` writers imitating any of the corpus's faces; the
first --images of its texts), then reads font_probe's 500 test texts in the unseen split's handwriting faces and in all
its faces. Only the stem changes:

- `pretrained`: the first 21 convolutions of RapidOCR's PP-OCRv4 recognizer (PPLCNetV3 to its last stride-4 layer,
  240 channels; the ONNX model of the rapidocr_onnxruntime 1.4.4 wheel, trained on real text), frozen: the ocr
  extension's `TextStem` (vision_stem ocr.pplcnet) without its patchify;
- `pretrained8`: the same recognizer two depthwise + pointwise pairs deeper (stride 8 down, 4 across, 480 channels,
  with squeeze-excite): `TextStem`'s `ocr.pplcnet8` cut;
- `pretrained16`: the recognizer's whole backbone (two pairs more, stride 16 down): `ocr.pplcnet16`; its reader
  patchifies 1 x 2 onto a 2 x 24 grid (the line's 32 px are two of its rows);
- `scratch`: four 3x3 convolutions to the same stride and channels, trained with the rest. (The pretrained stem's
  own layers at random, trained, would be the closer control, but its depthwise convolutions' backward pass takes
  seconds a step on two CPU cores.)

    python bench/stem_probe.py --fonts FONTS                    # on CPU: 6,000 lines, 800 steps
    python bench/stem_probe.py --fonts FONTS --text-height 56   # words as large as the recipe's tower sees them
    python bench/stem_probe.py --fonts FONTS --images 48000 --steps 6000 --workers 16   # at the recipe's scale, on a GPU

Prints one JSON line per stem: exact-match accuracy on each test set.
"""

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from font_probe import draws, fit, hand_faces, handwriting, unseen_sets
from PIL import Image
from torch import nn

from beni_model.ocr.heads import READING_ALPHABET, greedy_transcripts
from beni_model.ocr.stem import TextStem
from beni_pipeline.prep.fonts import corpus_fonts

PRETRAINED = {"pretrained": "pplcnet", "pretrained8": "pplcnet8", "pretrained16": "pplcnet16"}  # probe name -> TextStem cut


def scratch_stem() -> nn.Module:
    """A stem of the recipe's kind, trained from scratch: convolutions to stride 4 and the pretrained one's 240
    channels."""

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.GELU()]

    return nn.Sequential(*block(3, 32, 2), *block(32, 64, 1), *block(64, 128, 2), *block(128, 240, 1))


def pixels(lines: torch.Tensor) -> torch.Tensor:
    """font_probe's lines [batch, 32, 192] (or a multiple, `scaled`) uint8 as the recognizer's input: RGB in -1..1."""
    return (lines[:, None].float() / 127.5 - 1).expand(-1, 3, -1, -1)


class Reader(nn.Module):
    """A stem's features (stride 4: [batch, 240, 8, 48]; `pretrained8`'s stride 8 down: [batch, 480, 4, 48]) ->
    [batch, 24 reads, classes], through a `rows` x 24 patch grid (4; 2 for `pretrained16`'s stride 16 down on the
    32 px canvas)."""

    def __init__(self, classes: int, width: int = 128, channels: int = 240, kernel: tuple[int, int] = (2, 2), rows: int = 4):
        super().__init__()
        self.patchify = nn.Conv2d(channels, width, kernel, stride=kernel)
        self.position = nn.Parameter(torch.zeros(1, rows * 24, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.pool = nn.Parameter(torch.zeros(width))
        self.classify = nn.Linear(width, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        grid = self.patchify(features.float())
        batch, width, rows, columns = grid.shape
        tokens = self.encoder(grid.flatten(2).transpose(1, 2) + self.position).view(batch, rows, columns, width)
        weights = (tokens @ self.pool).softmax(1)
        return self.classify((weights.unsqueeze(-1) * tokens).sum(1))


def canvas_scale(text_height: int) -> int:
    """How many times font_probe's 32 x 192 canvas the lines are drawn on: 1 up to its 28 px text, 2 up to 56 px."""
    return max(1, -(-text_height // 28))


def scaled(lines: np.ndarray, text_height: int) -> np.ndarray:
    """font_probe's lines (text 28 px high) scaled to `text_height`, top left on a white canvas `canvas_scale` times
    theirs: the small text of a document page at the recipe's 384 px, or (56 px, on a 64 x 384 canvas whose 16 px
    patches make the same 4 x 24 grid) a word as the recipe's tower sees it, its patches 16 px as the recipe's."""
    if text_height == 28:
        return lines
    scale = canvas_scale(text_height)
    height, width = lines.shape[1:]
    out = np.full((len(lines), height * scale, width * scale), 255, dtype=lines.dtype)
    size = (round(width * text_height / 28), round(height * text_height / 28))
    for line, canvas in zip(lines, out):
        canvas[: size[1], : size[0]] = np.asarray(Image.fromarray(line).resize(size, Image.Resampling.BILINEAR))
    return out


def drawn(texts: list[str], fonts, hands, seed: str, workers: int) -> np.ndarray:
    """font_probe's handwriting of `texts`, drawn in `workers` processes (each chunk from a seed of its own)."""
    if workers == 1:
        return handwriting(texts, fonts, hands, 0.0, 0.0, 0.0, seed)
    chunks = [texts[i : i + 1000] for i in range(0, len(texts), 1000)]
    with ProcessPoolExecutor(workers) as pool:
        parts = pool.map(handwriting, chunks, *zip(*[(fonts, hands, 0.0, 0.0, 0.0, f"{seed}:{i}") for i in range(len(chunks))]))
        return np.concatenate(list(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fonts", type=Path, required=True)
    parser.add_argument("--stems", nargs="+", default=["pretrained", "scratch"], choices=[*PRETRAINED, "scratch"])
    parser.add_argument("--images", type=int, default=6_000)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes drawing the training lines (1: the draws of the CPU runs)")
    parser.add_argument("--text-height", type=int, default=28, help="the lines' text height in px (28: as drawn; 14-56: scaled)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    texts, tests = draws(args.seed, 24_000, args.test)  # font_probe's texts: the first --images of its training ones
    texts = texts[: args.images]
    fonts = corpus_fonts(args.fonts)
    hands = hand_faces(args.fonts, fonts)
    train = torch.from_numpy(scaled(drawn(texts, fonts, hands, f"{args.seed}:train", args.workers), args.text_height)).to(args.device)
    sets = {
        "own_handwriting": handwriting(tests, fonts, hands, 0.0, 0.0, 0.0, f"{args.seed}:own"),
        **unseen_sets(args.fonts, tests, args.seed),
    }
    sets = {name: torch.from_numpy(scaled(images, args.text_height)).to(args.device) for name, images in sets.items()}
    scale = canvas_scale(args.text_height)
    patch = 8 * scale  # the reader's patch: a 4 x 24 grid over the canvas
    for name in args.stems:
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        if name.startswith("pretrained"):  # frozen: its features once, in half precision
            frozen = TextStem(patch_size=16, hidden_size=1, cut=PRETRAINED[name]).to(args.device)
            frozen.load_pretrained()
            frozen.patchify = nn.Identity()
            with torch.no_grad():
                cached = lambda images: torch.cat([frozen(pixels(images[i : i + 64])).half() for i in range(0, len(images), 64)])  # noqa: E731
                inputs, test_inputs = cached(train), {k: cached(v) for k, v in sets.items()}
            stride = frozen.cut.stride
            kernel = (max(1, patch // stride[0]), patch // stride[1])
            rows = 32 * scale // (stride[0] * kernel[0])
            model = run = Reader(1 + len(READING_ALPHABET), channels=frozen.layers[-1][1], kernel=kernel, rows=rows).to(args.device)
        else:
            inputs, test_inputs = train, sets
            model = nn.Sequential(scratch_stem(), Reader(1 + len(READING_ALPHABET), kernel=(2 * scale, 2 * scale))).to(args.device)
            run = lambda x: model(pixels(x))  # noqa: E731
        features = time.perf_counter() - start
        loss = fit(model, run, inputs, texts, args, lr=1e-3)
        scores = {}
        with torch.no_grad():
            for set_name, images in test_inputs.items():
                reads = [t for i in range(0, len(images), 100) for t in greedy_transcripts(run(images[i : i + 100]))]
                scores[set_name] = round(100 * sum(a == b for a, b in zip(reads, tests)) / len(tests), 1)
        seconds = round(time.perf_counter() - start, 1)
        print(
            json.dumps({"stem": name, **scores, "final_loss": round(loss, 3), "seconds": seconds, "features_seconds": round(features, 1)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
