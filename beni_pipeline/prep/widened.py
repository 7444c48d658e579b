"""Corpus kinds that widen what the generator draws beyond synthetic.py's: text turned up to a quarter turn
("rotated"), and words photographed on a scene ("scene": a photo-like background, a tilted camera, light that falls
off across the frame, sometimes a bend). Each is a kind of CorpusSettings.kinds, so a run leaves it out by weight.

The unseen-renderer eval set (unseen_eval.py) shares no code with these: its camera, light and layout are its own.
"""

import random

import numpy as np
from PIL import Image

from beni_pipeline.prep import synthetic as syn

ROTATED_CAPTIONS = ('The text "{text}" turned on its side.', 'Rotated text that reads "{text}".', 'A tilted label: "{text}".')
SCENE_CAPTIONS = ('A photo of the word "{text}" in a scene.', 'The text "{text}" photographed at an angle.', 'A snapshot showing "{text}".')
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


SAMPLES = {"rotated": rotated_sample, "scene": scene_sample}
