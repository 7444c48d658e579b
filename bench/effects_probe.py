"""Does drawing text with many decorative effects teach a reader to read through effects it never saw? The
artistic words of the unseen renderer fill their letters with a gradient over a hard drop shadow; the corpus's word art
(`synthetic.WORD_ART`) draws neither. font_probe's reader (a small CNN with the project's CTC head) learns clean
one-line texts in the corpus's faces, plain, or plain half the time and otherwise decorated by one of the corpus's word
art effects (`synthetic.word_art`, in greys: dark ink, a light contrasting colour); then reads new texts in the unseen
split's faces plain, with those effects, and with the unseen renderer's gradient over a drop shadow. Grey on white, no
camera or layout: only the glyphs' decoration changes.

    python bench/effects_probe.py --fonts FONTS [--steps 1000]

Prints one JSON line per training set: exact-match accuracy on each test set.
"""

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from font_probe import HEIGHT, WIDTH, draws, train_and_score
from PIL import Image, ImageChops, ImageDraw, ImageFont

from beni_pipeline.prep import synthetic as syn
from beni_pipeline.prep.fonts import corpus_fonts, split_fonts

DECORATED = tuple(effect for effect in syn.WORD_ART if effect != "outline")  # an outline on white is plain text


def decorated(text: str, font_path: str, size: int, effect: str, rng: random.Random) -> Image.Image:
    """`text` in grey ink on white, decorated by `effect` (one of DECORATED, "gradient_shadow" or "plain")."""
    font, pad = ImageFont.truetype(font_path, size), size // 3
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(mask).text((pad - left, pad - top), text, font=font, fill=255)
    page = Image.new("L", mask.size, 255)
    ink, light = (rng.randint(0, 60),) * 3, (rng.randint(185, 255),) * 3
    if effect == "gradient_shadow":  # the unseen renderer's: a gradient fill over a hard drop shadow
        d = max(2, size // 20)
        page.paste(rng.randint(150, 190), (d, d), mask)
        fill = np.linspace(ink[0], rng.randint(90, 140), mask.height, dtype=np.float32)[:, None].repeat(mask.width, 1)
        page.paste(Image.fromarray(fill.astype(np.uint8)), (0, 0), mask)
    elif effect == "plain":
        page.paste(ink[0], (0, 0), mask)
    else:
        for paint, layer in syn.word_art(rng, effect, mask, ink, light, size):
            page.paste(paint.convert("L") if isinstance(paint, Image.Image) else paint[0], (0, 0), layer)
    return page


def fit(page: Image.Image) -> np.ndarray:
    """A grey line on white cut to its ink, 28 px high (squeezed to WIDTH where longer), left-aligned."""
    box = ImageChops.invert(page).getbbox() or (0, 0, 1, 1)
    page = page.crop(box)
    width = min(WIDTH - 4, max(1, round(page.width * 28 / page.height)))
    canvas = Image.new("L", (WIDTH, HEIGHT), 255)
    canvas.paste(page.resize((width, 28), Image.Resampling.BILINEAR), (2, 2))
    return np.asarray(canvas)


def dataset(texts: list[str], fonts: list[str], effects: tuple[str, ...], share: float, seed: str) -> np.ndarray:
    """`texts` in `fonts`, each with one of `effects` `share` of the time, else plain."""
    rng = random.Random(seed)
    lines = []
    for text in texts:
        effect = rng.choice(effects) if rng.random() < share else "plain"
        lines.append(fit(decorated(text, rng.choice(fonts), rng.randint(24, 48), effect, rng)))
    return np.stack(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fonts", type=Path, required=True)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5], help="shares of training lines with an effect")
    parser.add_argument("--images", type=int, default=24_000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    texts, tests = draws(args.seed, args.images, args.test)
    fonts, unseen = list(corpus_fonts(args.fonts)), list(split_fonts(args.fonts, "unseen"))
    sets = {
        "unseen_fonts_plain": dataset(tests, unseen, ("plain",), 0.0, f"{args.seed}:plain"),
        "unseen_fonts_corpus_effects": dataset(tests, unseen, DECORATED, 1.0, f"{args.seed}:corpus_effects"),
        "unseen_fonts_unseen_effect": dataset(tests, unseen, ("gradient_shadow",), 1.0, f"{args.seed}:unseen_effect"),
    }
    for share in args.shares:
        start = time.perf_counter()
        train = dataset(texts, fonts, DECORATED, share, f"{args.seed}:train")
        scores = train_and_score(train, texts, tests, sets, args)
        print(json.dumps({"effect_share": share, **scores, "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
