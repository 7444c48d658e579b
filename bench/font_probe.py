"""Do more font families teach a reader trained from scratch glyphs it never saw? A small CNN with a CTC head (the
project's `ctc_loss`, the reading head's alphabet and greedy decoding) learns to read clean one-line texts drawn in
F families of the corpus's faces (`fonts.corpus_fonts`, families drawn at random), with the same texts, sizes and
steps whatever F; then reads new texts in the unseen split's fonts and in its own families. Clean black on white:
no camera, no layout, so what changes between the columns is the glyphs alone.

    python bench/font_probe.py --fonts FONTS [--families 8 32 226] [--steps 1500]

With --hand-shares, the reader learns the corpus's handwriting instead (`synthetic.ink_line`: each letter at its own
size, tilt and height), its writers drawn from the corpus's handwriting faces (the train split's "hand" packages)
that share of the time, else from any of its faces (the corpus's rule: share 0), and reads new texts in the unseen
split's handwriting faces and in all its faces:

    python bench/font_probe.py --fonts FONTS --hand-shares 0 0.75

With --pen-shares, the writers write in pen strokes that share of the time (the corpus's optional kind "pen":
Hershey faces' centre lines drawn with a pen), else imitate any of the corpus's faces, and read the same test sets:

    python bench/font_probe.py --fonts FONTS --pen-shares 0 0.5

With --trace-shares, that share of the writers trace their strokes as hairlines or outlines (half each; `traced`),
the rest filled as the letter shapes are (the corpus's writers: share 0):

    python bench/font_probe.py --fonts FONTS --trace-shares 0 0.4

Prints one JSON line per F (or share): exact-match accuracy on each test set.
"""

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch import nn

from beni_model.ocr.ctc import ctc_loss
from beni_model.ocr.heads import READING_ALPHABET, greedy_transcripts, reading_targets
from beni_pipeline.prep import ocr_eval
from beni_pipeline.prep import synthetic as syn
from beni_pipeline.prep.fonts import corpus_fonts, family, split_fonts
from beni_pipeline.prep.widened import text_of

HEIGHT, WIDTH = 32, 192  # 48 reads after the CNN's 4x downsampling of the width


def fit_line(mask: Image.Image) -> np.ndarray:
    """A line's ink mask (white on black) as black ink on white, scaled to 28 px high (squeezed to WIDTH where
    longer), left-aligned."""
    mask = mask.crop(mask.getbbox() or (0, 0, 1, 1))
    width = min(WIDTH - 4, max(1, round(mask.width * 28 / mask.height)))
    canvas = Image.new("L", (WIDTH, HEIGHT), 255)
    canvas.paste(0, (2, 2), mask.resize((width, 28), Image.Resampling.BILINEAR))
    return np.asarray(canvas)


def draw(text: str, font_path: str, size: int) -> np.ndarray:
    font = ImageFont.truetype(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 4, bottom - top + 4))
    ImageDraw.Draw(mask).text((2 - left, 2 - top), text, font=font, fill=255)
    return fit_line(mask)


def draws(seed: int, images: int, test: int) -> tuple[list[str], list[str]]:
    """The probes' texts from `seed`: `images` training texts, then `test` test texts (held-out words, digit strings
    or random strings), each at most 14 characters."""
    rng = random.Random(seed)
    texts = [text_of(rng)[:14] for _ in range(images)]
    return texts, [rng.choice((lambda r: syn.word(r, ocr_eval.HELD_OUT), syn.digits, syn.random_string))(rng)[:14] for _ in range(test)]


def hand_faces(root: Path, fonts: list[str]) -> tuple[str, ...]:
    """The corpus's faces from the train split's handwriting packages."""
    hands = set(split_fonts(root, "train", "hand"))
    return tuple(path for path in fonts if path in hands)


def unseen_sets(root: Path, tests: list[str], seed: int) -> dict[str, np.ndarray]:
    """`tests` drawn in the unseen split's handwriting faces and in all its faces."""
    return {
        "unseen_hand_fonts": dataset(tests, list(split_fonts(root, "unseen", "hand")), f"{seed}:hand"),
        "unseen_fonts": dataset(tests, list(split_fonts(root, "unseen")), f"{seed}:unseen"),
    }


def dataset(texts: list[str], fonts: list[str], seed: str) -> np.ndarray:
    rng = random.Random(seed)
    return np.stack([draw(text, rng.choice(fonts), rng.randint(20, 40)) for text in texts])


def handwriting(
    texts: list[str],
    fonts: tuple[str, ...],
    hands: tuple[str, ...],
    hand_share: float,
    pen_share: float,
    trace_share: float,
    seed: str,
) -> np.ndarray:
    """`texts` as the corpus's handwriting renderer writes them (`synthetic.ink_line`), each
    writer's letters imitated from one of `hands` `hand_share` of the time, else from any of `fonts`, or written in pen
    strokes `pen_share` of the time; traced as a hairline or an outline `trace_share` of the time, half each."""
    rng = random.Random(seed)
    lines = []
    for text in texts:
        size = rng.randint(28, 52)
        trace = rng.choices(TRACES, (1 - trace_share, trace_share / 2, trace_share / 2))[0]
        with syn.using_fonts(hands if rng.random() < hand_share else fonts):
            mask = syn.ink_line(rng, text, syn.random_hand(rng, size, rng.random() < pen_share), size)
            lines.append(fit_line(traced(mask, trace, size)))
    return np.stack(lines)


# How a writer's strokes land on paper: filled as the letter shapes are (the corpus's writers), a hairline along their
# centre lines (a fine pen, a pencil), or an outline around them (letters sketched hollow).
TRACES = ("solid", "hairline", "outline")


def traced(mask: Image.Image, trace: str, size: int) -> Image.Image:
    if trace == "hairline":  # one pixel wide under 40 px letters, three above
        line = centre_lines(mask)
        return line.filter(ImageFilter.MaxFilter(3)) if size >= 40 else line
    return syn.hollow(mask, size) if trace == "outline" else mask


def centre_lines(mask: Image.Image) -> Image.Image:
    """The mask's strokes (grey levels over half) thinned to lines one pixel wide that keep their shape and joins
    (Zhang and Suen's thinning, each pass on the whole image)."""
    ink = np.pad(np.asarray(mask) > 127, 1)
    changed = True
    while changed:
        changed = False
        for first in (True, False):
            # The eight neighbours, clockwise from north: p2 .. p9
            p = [ink[:-2, 1:-1], ink[:-2, 2:], ink[1:-1, 2:], ink[2:, 2:], ink[2:, 1:-1], ink[2:, :-2], ink[1:-1, :-2], ink[:-2, :-2]]
            count = sum(q.astype(np.uint8) for q in p)
            turns = sum((~p[i] & p[(i + 1) % 8]).astype(np.uint8) for i in range(8))
            n, e, s, w = p[0], p[2], p[4], p[6]
            away = ~(n & e & s) & ~(e & s & w) if first else ~(n & e & w) & ~(n & s & w)
            drop = ink[1:-1, 1:-1] & (count >= 2) & (count <= 6) & (turns == 1) & away
            if drop.any():
                ink[1:-1, 1:-1] &= ~drop
                changed = True
    return Image.fromarray((ink[1:-1, 1:-1] * 255).astype(np.uint8))


class Reader(nn.Module):
    def __init__(self, classes: int):
        super().__init__()

        def block(c_in: int, c_out: int, pool: tuple[int, int]) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(pool)]

        self.body = nn.Sequential(*block(1, 32, (2, 2)), *block(32, 64, (2, 2)), *block(64, 128, (2, 1)), *block(128, 128, (4, 1)))
        self.head = nn.Linear(128, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [batch, HEIGHT, WIDTH] uint8 -> [batch, reads, classes]
        features = self.body(1 - images[:, None].float() / 255)
        return self.head(features.squeeze(2).transpose(1, 2))


def read(model: Reader, images: np.ndarray) -> list[str]:
    with torch.no_grad():
        return [t for i in range(0, len(images), 256) for t in greedy_transcripts(model(torch.from_numpy(images[i : i + 256])))]


def train_and_score(train: np.ndarray, texts: list[str], tests: list[str], sets: dict[str, np.ndarray], args) -> dict:
    """Trains a Reader on `train` (reading `texts`) and returns its exact-match accuracy on each of `sets` (reading `tests`)."""
    torch.manual_seed(args.seed)
    model = Reader(1 + len(READING_ALPHABET))  # CTC's blank, then the alphabet
    loss = fit(model, model, torch.from_numpy(train), texts, args, lr=2e-3)
    scores = {name: round(100 * sum(a == b for a, b in zip(read(model, images), tests)) / len(tests), 1) for name, images in sets.items()}
    return {**scores, "final_loss": round(loss, 3)}


def fit(model: nn.Module, run, inputs: torch.Tensor, texts: list[str], args, lr: float) -> float:
    """Trains `model` (`run` reads a batch of `inputs`) by CTC to read `texts`, args.steps batches of args.batch_size
    drawn from args.seed, one cycle of `lr`, on the device `inputs` are on; leaves it in eval mode and returns the last
    loss."""
    targets, lengths = (t.to(inputs.device) for t in reading_targets(texts))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=args.steps, pct_start=0.1)
    order = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        batch = torch.randint(0, len(inputs), (args.batch_size,), generator=order).to(inputs.device)
        loss = ctc_loss(run(inputs[batch]).log_softmax(-1), targets[batch], lengths[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fonts", type=Path, required=True)
    parser.add_argument("--families", type=int, nargs="+", default=[8, 32, 226])
    parser.add_argument(
        "--hand-shares", type=float, nargs="+", help="learn the corpus's handwriting with these shares of handwriting faces"
    )
    parser.add_argument(
        "--pen-shares", type=float, nargs="+", help="learn the corpus's handwriting with these shares of pen-stroke writers"
    )
    parser.add_argument(
        "--trace-shares",
        type=float,
        nargs="+",
        help="learn the corpus's handwriting with these shares of writers tracing hairlines or outlines (half each)",
    )
    parser.add_argument("--images", type=int, default=24_000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    by_family: dict[str, list[str]] = {}
    for path in corpus_fonts(args.fonts):
        by_family.setdefault(family(path), []).append(path)
    names = sorted(by_family)
    texts, tests = draws(args.seed, args.images, args.test)
    if args.hand_shares or args.pen_shares or args.trace_shares:
        fonts = corpus_fonts(args.fonts)
        hands = hand_faces(args.fonts, fonts)
        sets = unseen_sets(args.fonts, tests, args.seed)
        kinds = ("hand_share", "pen_share", "trace_share")
        runs = [(name, share) for name in kinds for share in getattr(args, name + "s") or ()]
        for name, share in runs:
            start = time.perf_counter()
            shares = tuple(share if kind == name else 0.0 for kind in kinds)
            train = handwriting(texts, fonts, hands, *shares, f"{args.seed}:train")
            own = {"own_handwriting": handwriting(tests, fonts, hands, *shares, f"{args.seed}:own")}
            scores = train_and_score(train, texts, tests, {**own, **sets}, args)
            print(json.dumps({name: share, **scores, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        return
    unseen = dataset(tests, list(split_fonts(args.fonts, "unseen")), f"{args.seed}:unseen")
    for count in args.families:
        chosen = random.Random(f"{args.seed}:{count}").sample(names, min(count, len(names)))
        fonts = [path for name in chosen for path in by_family[name]]
        start = time.perf_counter()
        train = dataset(texts, fonts, f"{args.seed}:train")
        scores = train_and_score(
            train, texts, tests, {"own_fonts": dataset(tests, fonts, f"{args.seed}:own"), "unseen_fonts": unseen}, args
        )
        print(
            json.dumps({"families": len(chosen), "faces": len(fonts), **scores, "seconds": round(time.perf_counter() - start, 1)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
