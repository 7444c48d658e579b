"""Corpus kinds that widen what the generator draws beyond synthetic.py's: text turned up to a quarter turn
("rotated"), words photographed on a scene ("scene": a photo-like background, a tilted camera, light that falls
off across the frame, sometimes a bend), and words set letter by letter along a bow ("arched": each letter turned
to the curve, as on a badge, a logo or a bottle, where synthetic.py's curved text bends the whole image's columns).
Each is a kind of CorpusSettings.kinds, so a run leaves it out by weight.

The unseen-renderer eval set (unseen_eval.py) shares no code with these: its camera, light and layout are its own.
"""

import random

import numpy as np
from PIL import Image, ImageDraw, ImageStat

from beni_pipeline.prep import synthetic as syn

ROTATED_CAPTIONS = ('The text "{text}" turned on its side.', 'Rotated text that reads "{text}".', 'A tilted label: "{text}".')
SCENE_CAPTIONS = ('A photo of the word "{text}" in a scene.', 'The text "{text}" photographed at an angle.', 'A snapshot showing "{text}".')
ARCHED_CAPTIONS = ('The word "{text}" set along a curve.', 'Arched lettering that reads "{text}".', 'A curved line of text: "{text}".')
MAX_READ_ANGLE = 35  # beyond it a line no longer runs along the image's columns, which the reading head's transcript assumes


def text_of(rng: random.Random) -> str:
    return rng.choice((syn.TEXTS["word"], syn.digits, syn.random_string))(rng)


def rotated_sample(rng: random.Random) -> syn.Rendered:
    """A word, number or code turned by 20 to 90 degrees either way, on any background."""
    text, angle = text_of(rng), rng.choice((-1, 1)) * rng.uniform(20, 90)
    image = syn.render_text(rng, text, syn.text_style(rng, rotation=angle, size=(28, 64)))
    question = rng.choice(syn.READ_QUESTIONS + ("Read the rotated text.",))
    transcript = text if abs(angle) <= MAX_READ_ANGLE else None
    return syn.Rendered("rotated", image, rng.choice(ROTATED_CAPTIONS).format(text=text), [(question, text)], transcript)


def tilt(image: Image.Image, rng: random.Random, amount: float) -> Image.Image:
    """The image seen by a camera off its axis: each corner moved inwards by up to `amount` of the side."""
    w, h = image.size

    def jitter(x: float, y: float) -> tuple[float, float]:
        return x + rng.uniform(-amount, amount) * w, y + rng.uniform(-amount, amount) * h

    quad = (*jitter(0, 0), *jitter(0, h), *jitter(w, h), *jitter(w, 0))
    return image.transform(image.size, Image.Transform.QUAD, quad, Image.Resampling.BILINEAR, fillcolor=image.getpixel((0, 0)))


def falloff(image: Image.Image, rng: random.Random) -> Image.Image:
    """Light that fades across the frame along a random direction: from full to 55-85% brightness."""
    w, h = image.size
    angle, dim = rng.uniform(0, 2 * np.pi), rng.uniform(0.55, 0.85)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = x * np.cos(angle) + y * np.sin(angle)
    gain = 1 - (1 - dim) * (t - t.min()) / (np.ptp(t) + 1)
    return Image.fromarray((np.asarray(image, np.float32) * gain[..., None]).astype(np.uint8))


def scene_sample(rng: random.Random) -> syn.Rendered:
    """A word, number or code on a photo-like background, photographed: tilted, unevenly lit, sometimes bent."""
    text = text_of(rng)
    style = syn.text_style(rng, backgrounds=("photo", "textured"), rotation=rng.uniform(-12, 12), size=(28, 72))
    image = falloff(tilt(syn.render_text(rng, text, style), rng, 0.08), rng)
    if rng.random() < 0.3:
        image = syn.curve(image, rng, (0.02, 0.08))
    question = rng.choice(syn.READ_QUESTIONS + ("What does the sign in the photo say?",))
    return syn.Rendered("scene", image, rng.choice(SCENE_CAPTIONS).format(text=text), [(question, text)], text)


def bow(text: str, font, bend: float) -> Image.Image:
    """A grey mask of `text` along a quadratic Bezier bow, its middle raised (or lowered, `bend` < 0) by half `bend` of its
    chord, each letter centred on the bow and turned to its direction there; letters spaced by their advances along
    the curve, so the chord is as much shorter than the text as the bow is longer."""
    advances = [font.getlength(ch) * 1.05 for ch in text]
    t = np.linspace(0, 1, 512)
    x, y = t, -2 * bend * t * (1 - t)  # a bow of unit chord, sampled densely
    steps = np.hypot(np.diff(x), np.diff(y))
    chord = sum(advances) / steps.sum()
    x, y, along = x * chord, y * chord, np.concatenate([[0], np.cumsum(steps) * chord])
    dx, dy = np.gradient(x), np.gradient(y)
    pad, rise = round(font.size * 1.5), abs(bend) * chord / 2
    mask = Image.new("L", (round(chord) + 2 * pad, round(rise) + 2 * pad))
    top = pad + (rise if bend > 0 else 0)
    position = 0.0
    for ch, advance in zip(text, advances):
        i = min(len(t) - 1, int(np.searchsorted(along, position + advance / 2)))
        position += advance
        if not ch.strip():
            continue
        left, up, right, down = font.getbbox(ch)
        glyph = Image.new("L", (right - left + 4, down - up + 4))
        ImageDraw.Draw(glyph).text((2 - left, 2 - up), ch, font=font, fill=255)
        turned = glyph.rotate(-np.degrees(np.arctan2(dy[i], dx[i])), Image.Resampling.BICUBIC, expand=True)
        mask.paste(255, (round(pad + x[i] - turned.width / 2), round(top + y[i] - turned.height / 2)), turned)
    return mask.crop(mask.getbbox())


def arched_sample(rng: random.Random) -> syn.Rendered:
    """A word set along a bow on any background, most often in the middle of it."""
    text = syn.word(rng, syn.CORPUS_VOCABULARY)
    font = syn.load_font(rng.choice(syn.font_paths()), rng.randint(28, 56))
    mask = bow(text, font, rng.choice((-1, 1)) * rng.uniform(0.1, 0.35))  # the end letters turned 11-35 degrees
    mask.thumbnail((syn.MAX_SIDE - 40, syn.MAX_SIDE - 40))
    size = (max(syn.MIN_SIDE, mask.width + rng.randint(20, 160)), max(syn.MIN_SIDE, mask.height + rng.randint(20, 160)))
    canvas = syn.background(rng, size, rng.choice(syn.BACKGROUNDS))
    on_light = ImageStat.Stat(canvas.convert("L")).mean[0] > 128  # as render_text tells light paper
    canvas.paste(syn.ink_colour(rng, on_light), (rng.randint(0, size[0] - mask.width), rng.randint(0, size[1] - mask.height)), mask)
    question = rng.choice(syn.KIND_QUESTIONS["curved"])
    return syn.Rendered("arched", canvas, rng.choice(ARCHED_CAPTIONS).format(text=text), [(question, text)], text)


SAMPLES = {"rotated": rotated_sample, "scene": scene_sample, "arched": arched_sample}
