"""The embedded default corpus: seeded images of text (printed words, numbers, random strings and sentences;
curved and artistic words; handwriting and handwritten formulas; receipts, forms, memos and shop signs) with
captions, LLaVA-style OCR conversations and a known set of planted near-duplicates, so the whole pipeline runs
offline on a fresh machine.

Every renderer is a pure function of a `random.Random` (and of a `Vocabulary` where it draws words), so the
held-out OCR eval set (ocr_eval.py) is drawn from the same renderers with other seeds and other words.

Over 400 lines because it holds every renderer of the corpus (about two dozen, each a few lines) and the
vocabulary, fonts and noise they share; the held-out set (ocr_eval.py) draws from the same module.
"""

import glob
import io
import json
import math
import os
import random
import re
import shutil
import textwrap
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cache, lru_cache, partial
from pathlib import Path

import numpy as np
from HersheyFonts import HersheyFonts
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, ImageStat

from beni_model.files import atomic_path, remove_leftovers
from beni_pipeline.prep import photo
from beni_pipeline.prep.files import write_text_atomic
from beni_pipeline.prep.fonts import covers
from beni_pipeline.prep.processes import process_pool

FONT_GLOB = "/usr/share/fonts/**/*.ttf"
MIN_FONT_SIZE = 16  # smallest text we render; below it OCR labels stop being trustworthy
MAX_SIDE = 800
MIN_SIDE = 160
JPEG_QUALITY = 90
CHUNK = 50  # samples per pool task
FORMAT = 3  # of the corpus rows: a corpus written by another format is regenerated (2: transcripts, 3: documents' lines)
BACKGROUNDS = ("plain", "textured", "photo")

ADJECTIVES = """old young small large quiet bright dark happy tired clever busy lazy brave gentle
rapid silent golden frozen hidden broken ancient modern simple heavy narrow wide sunny windy purple
green yellow orange""".split()
NOUNS = """cat dog bird horse river mountain garden window teacher doctor farmer baker child
student captain driver market station library kitchen bridge forest island letter ticket bottle
engine camera guitar pencil basket lantern harbor village museum castle robot planet coffee""".split()
VERBS = """found painted carried opened visited watched repaired followed cleaned crossed built
sold bought described remembered borrowed noticed delivered photographed washed""".split()
TAILS = (
    "",
    " today",
    " every morning",
    " near the river",
    " after lunch",
    " in the park",
    " on Monday",
    " at night",
    " again",
    " with great care",
    " before sunrise",
    " last winter",
)
FIRST_NAMES = """Anna Ben Clara David Emma Felix Grace Hugo Iris Jonas Kira Liam Maya Noah Olga
Paul Rosa Sam Tara Victor Wendy Yusuf Zoe Omar Lena Marco""".split()
LAST_NAMES = """Smith Keller Novak Garcia Rossi Tanaka Okafor Berg Dubois Larsen Silva Moreau Fischer
Khan Murphy Ivanova Costa Weber Lindqvist Patel""".split()
CITIES = """Lisbon Oslo Denver Kyoto Nairobi Dublin Porto Quebec Lyon Tallinn Austin Bergen Malmo
Seville Krakow Leeds Utrecht Geneva""".split()
STREETS = """Oak Maple Station Mill Church Harbor Park Bridge Castle Market""".split()
SHOP_WORDS = """Corner Sunny Blue Golden Green Little Happy Red Village Harbor Daily Fresh""".split()
SHOP_TYPES = """Market Cafe Bakery Grocery Deli Pharmacy Books Hardware Kiosk Bistro""".split()
ITEMS = """Coffee Tea Bagel Croissant Milk Bread Apples Bananas Eggs Cheese Butter Juice Water
Pasta Rice Tomatoes Soap Batteries Notebook Pen Sandwich Muffin Yogurt Chocolate Honey Olives
Salad Soup Cookies Oranges""".split()
MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
MEMO_TITLES = ("MEMORANDUM", "INTERNAL MEMO", "NOTICE", "MEETING NOTE")
LABELLED_MEMO_TITLES = MEMO_TITLES + ("MEMO", "OFFICE MEMO", "STAFF BULLETIN", "UPDATE")
# The optional kind "labelled" draws documents whose labels vary as offices write them: one of each field's per
# document, in one case, then one of LABEL_ENDS, their order and alignment varying too. A model that saw one
# spelling and one layout learns where the answer sits, not what its label says (bench/BENCHMARKS.md).
MEMO_LABELS = {
    "To": ("To", "Attn", "Attention", "For", "Recipient"),
    "From": ("From", "By", "Sender", "Author"),
    "Date": ("Date", "Dated", "Sent"),
    "Subject": ("Subject", "Re", "Regarding", "Topic"),
}
LABEL_ENDS = (": ", ": ", " ", " - ")
MATH_LETTERS = list("abcxyznkmt")
GREEK = {r"\alpha": "α", r"\beta": "β", r"\theta": "θ", r"\pi": "π", r"\lambda": "λ", r"\sigma": "σ"}  # LaTeX: glyph
PEN_INKS = ((25, 45, 150), (20, 20, 30), (35, 35, 110), (80, 80, 90), (140, 25, 35))  # blue, black, navy, pencil, red

READ_QUESTIONS = (
    "What is written in the image?",
    "What does the text say?",
    "Read the text in the image.",
    "What text appears in this image?",
    "Transcribe the text in the image.",
    "What is the text in the image?",
    "what is written in the image?",
)  # OCRBench's recognition prompt as it asks it: "what" is another token than "What"
KIND_QUESTIONS = {
    "word": READ_QUESTIONS + ("What word is shown in the image?", "Which word is written here?"),
    "digits": READ_QUESTIONS + ("What number is shown in the image?", "Which digits are written in the image?"),
    "random": READ_QUESTIONS + ("What characters are written in the image?", "Read the character string exactly."),
    "sentence": READ_QUESTIONS + ("What sentence is written in the image?",),
    "curved": READ_QUESTIONS + ("What does the curved text say?", "Read the tilted word in the image."),
    "artistic": READ_QUESTIONS + ("What does the decorative text say?", "Which word is written in this stylised lettering?"),
    "handwriting": READ_QUESTIONS + ("What is handwritten here?", "Transcribe the handwriting."),
}
KIND_QUESTIONS["pen"] = KIND_QUESTIONS["handwriting"]
HME_QUESTION = "Please write out the expression of the formula in the image using LaTeX format."  # OCRBench's wording
MATH_QUESTIONS = (HME_QUESTION, "Write the handwritten formula in LaTeX.", "What is the LaTeX code of this expression?")
MEMO_QUESTIONS = {
    "To": "Who is the memo addressed to?",
    "From": "Who wrote the memo?",
    "Date": "What is the date of the memo?",
    "Subject": "What is the subject of the memo?",
}
# The corpus asks each in several ways (the eval sets ask MEMO_QUESTIONS').
MEMO_ASKED = {
    "To": (MEMO_QUESTIONS["To"], "Who is this memo for?", "Who receives the memo?", "To whom is the memo sent?"),
    "From": (MEMO_QUESTIONS["From"], "Who sent this memo?", "Who is the memo from?", "Whose memo is this?"),
    "Date": (MEMO_QUESTIONS["Date"], "When was the memo written?", "What date is on the memo?"),
    "Subject": (MEMO_QUESTIONS["Subject"], "What is the memo about?", "What is the memo's subject line?"),
}
SIGN_QUESTIONS = {
    "name": "What is the name of the shop on the sign?",
    "year": "In which year was the shop established?",
    "hours": "What are the opening hours on the sign?",
}
THINGS = {"word": "word", "digits": "number", "random": "character string", "sentence": "sentence"}
TEXT_CAPTIONS = (
    'An image with the text "{text}".',
    'A picture of the {thing} "{text}" on a {bg} background.',
    'The {thing} "{text}" written in {font} type.',
    'Rendered text that reads "{text}".',
    'A {bg} background with the {thing} "{text}" on it.',
    'Close-up of the {thing} "{text}".',
)
BG_WORDS = {"plain": "plain", "textured": "textured", "photo": "photo-like"}
DRAWN_CAPTIONS = {
    "curved": ('The word "{text}" written along a curve.', 'Curved, tilted text that reads "{text}".', 'A bent word: "{text}".'),
    "artistic": ('The word "{text}" in decorative lettering over a photo.', 'Stylised text that reads "{text}".'),
    "handwriting": ('Handwritten text that reads "{text}".', 'A note written by hand: "{text}".', 'The handwriting says "{text}".'),
    "math": ('A handwritten formula: "{text}".', 'The expression "{text}" written by hand.'),
}
DRAWN_CAPTIONS["pen"] = DRAWN_CAPTIONS["handwriting"]
MEMO_CAPTIONS = ("A memo from {by} to {to}.", "A printed memo about the {subject}.", "An office memo dated {date}.")
SIGN_CAPTIONS = ("A shop sign for {name}.", "A photo of the sign of {name}, open {hours}.", "The sign of {name} on a street.")
RECEIPT_CAPTIONS = (
    "A receipt from {store} with a total of {total}.",
    "A photo of a shop receipt from {store}, dated {date}.",
    "A printed receipt from {store} listing {n} items.",
    "A receipt dated {date} with a total of {total}.",
)
FORM_CAPTIONS = (
    "A filled-in {title} for {name}.",
    "A picture of a filled-in {title} with {n} fields.",
    "A scanned {title} completed by {name}.",
)
# Words of caption templates (never of the quoted or generated text) that a near-duplicate caption may swap.
SYNONYMS = {
    "image": "picture",
    "picture": "photo",
    "photo": "picture",
    "written": "printed",
    "reads": "says",
    "background": "backdrop",
    "receipt": "bill",
    "Rendered": "Printed",
    "filled-in": "completed",
}


# Syllables of made-up words: with a closed word list a model learns to recall the list, not to read letters.
ONSETS = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl st tr ch sh th".split()
VOWELS = "a e i o u y ai ea ee oo ou".split()
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "x"]


def invented_word(rng: random.Random) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(1, 2)))


@dataclass(frozen=True)
class Vocabulary:
    """The words that renderers drawing names and phrases use (verbs in the past tense). The corpus uses
    CORPUS_VOCABULARY; the held-out eval set passes its own, which shares no word with it."""

    adjectives: list[str]
    nouns: list[str]
    verbs: list[str]
    first_names: list[str]
    last_names: list[str]
    shop_types: list[str]
    invented: float = 0.0  # share of draws that are made-up words instead (capitalized where the list is)

    def pick(self, rng: random.Random, words: list[str]) -> str:
        if self.invented and rng.random() < self.invented:
            made_up = invented_word(rng)
            return made_up.capitalize() if words[0][0].isupper() else made_up
        return rng.choice(words)


CORPUS_VOCABULARY = Vocabulary(ADJECTIVES, NOUNS, VERBS, FIRST_NAMES, LAST_NAMES, SHOP_TYPES, invented=0.5)


@dataclass(frozen=True)
class CorpusSettings:
    samples: int = 2000
    seed: int = 0
    duplicate_fraction: float = 0.05
    kinds: dict[str, float] = field(default_factory=lambda: dict(KINDS))  # the kinds of samples drawn, with their weights
    fonts: tuple[str, ...] = ()  # font files to draw with (fonts.split_fonts(root, "train")); empty: the machine's own
    letter_spacing: bool = False  # one-line texts sometimes drawn with letters spread apart or squeezed together
    photos: float = 0.0  # the share of samples photographed after drawing (photo.py: perspective, light, blur, noise, JPEG)


@dataclass(frozen=True)
class TextStyle:
    font: str | None  # a font file, or None for Pillow's built-in font
    size: int
    background: str  # one of BACKGROUNDS
    rotation: float  # degrees, counter-clockwise
    blur: float  # box-blur radius of the glyphs in pixels (one pass: a third of a Gaussian's cost); 0 for none
    noise: float  # amplitude of grey grain over the whole image; 0 for none
    tracking: float = 0.0  # extra space after each letter of a one-line text, as a fraction of the font size
    effect: str | None = None  # one of WORD_ART: how the letters are decorated (default: an outline on photos)


@dataclass
class Rendered:
    """One sample before it is written: the image, its caption, its (question, answer) pairs and, for an image of
    one line of text, that text (the reading head's target); for a document, every text line on it with its
    vertical centre as a fraction of the image's height, top to bottom (the line head's targets)."""

    kind: str
    image: Image.Image
    caption: str
    qa: list[tuple[str, str]]
    transcript: str | None = None
    lines: list[tuple[str, float]] | None = None


# A text line as drawn: its text and the centre of its box in pixels. Renderers move the centres with the page, and
# `line_fractions` turns them into the sample's `lines`.
Line = tuple[str, float, float]


def drawn_line(xy: tuple[float, float], text: str, font: ImageFont.FreeTypeFont, anchor: str = "la") -> Line:
    """The Line of `draw.text(xy, text, font=font, anchor=anchor)`."""
    left, top, right, bottom = font.getbbox(text, anchor=anchor)
    return text, xy[0] + (left + right) / 2, xy[1] + (top + bottom) / 2


def rotated_lines(lines: list[Line], size: tuple[int, int], degrees: float, rotated_size: tuple[int, int]) -> list[Line]:
    """Where `image.rotate(degrees, expand=True)` (counter-clockwise about the centre) moves the lines' centres."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    moved = []
    for text, x, y in lines:
        dx, dy = x - size[0] / 2, y - size[1] / 2
        moved.append((text, rotated_size[0] / 2 + dx * c + dy * s, rotated_size[1] / 2 - dx * s + dy * c))
    return moved


def shifted_lines(lines: list[Line], dx: float, dy: float) -> list[Line]:
    return [(text, x + dx, y + dy) for text, x, y in lines]


def line_fractions(lines: list[Line], size: tuple[int, int]) -> list[tuple[str, float]]:
    """The sample's `lines`: each text whose centre lies in the image, with that centre's height as a fraction of
    the image's, top to bottom."""
    inside = [(text, y / size[1]) for text, x, y in lines if 0 <= x < size[0] and 0 <= y < size[1]]
    return sorted(((text, round(y, 4)) for text, y in inside), key=lambda line: line[1])


# ---------------------------------------------------------------- fonts, colours, backgrounds


_fonts: tuple[str, ...] = ()  # set by `using_fonts`


def font_paths() -> tuple[str | None, ...]:
    """The fonts `using_fonts` set, else every TrueType font on the machine, else (None,): Pillow's built-in font."""
    return _fonts or machine_fonts()


@cache
def machine_fonts() -> tuple[str | None, ...]:
    return tuple(sorted(glob.glob(FONT_GLOB, recursive=True))) or (None,)


@contextmanager
def using_fonts(fonts: tuple[str, ...]):
    """Renderers draw with `fonts` (empty: the machine's own) inside the block."""
    global _fonts
    previous, _fonts = _fonts, tuple(fonts)
    try:
        yield
    finally:
        _fonts = previous


@lru_cache(maxsize=1024)  # bounded: a few hundred fetched fonts at every size would hold thousands of open faces
def load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


@cache
def draw_greek(fonts: tuple[str | None, ...]) -> bool:
    """Whether every font draws the Greek letters formulas use (Pillow's built-in font and many script faces do not)."""
    return all(path and covers(load_font(path, 32), "".join(GREEK.values())) for path in fonts)


def font_words(path: str | None) -> str:
    """'bold italic serif' and the like, from the font's file name."""
    name = Path(path).stem.lower() if path else ""
    family = "monospace" if "mono" in name else "serif" if "serif" in name and "sans" not in name else "sans-serif"
    return " ".join(["bold"] * ("bold" in name) + ["italic"] * ("italic" in name or "oblique" in name) + [family])


def light_colour(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(220, 255)
    return tuple(base - rng.randint(0, 30) for _ in range(3))


def paper_colour(rng: random.Random) -> tuple[int, int, int]:
    """Mostly light paper, sometimes a dark board; never mid-grey, so dark or light ink always reads."""
    return light_colour(rng) if rng.random() < 0.8 else tuple(rng.randint(10, 70) for _ in range(3))


def ink_colour(rng: random.Random, on_light: bool) -> tuple[int, int, int]:
    lo, hi = (0, 90) if on_light else (185, 255)
    return tuple(rng.randint(lo, hi) for _ in range(3))


def background(rng: random.Random, size: tuple[int, int], style: str) -> Image.Image:
    """A plain colour, textured paper (blotches, sometimes ruled lines), or a photo-like scene (gradient and soft blobs)."""
    w, h = size
    if style == "plain":
        return Image.new("RGB", size, paper_colour(rng))
    nrng = np.random.default_rng(rng.getrandbits(64))
    # Both textures are drawn at low resolution and scaled up: smooth, and cheap at any size.
    if style == "textured":
        base = np.array(paper_colour(rng), np.float32)
        small = base + nrng.normal(0, rng.uniform(4, 16), (h // 12 + 2, w // 12 + 2, 1))
        image = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
        if rng.random() < 0.3:
            draw, step = ImageDraw.Draw(image), rng.randint(18, 40)
            line = tuple(int(c) for c in np.clip(base + ((-50, -35, 0) if base.mean() > 128 else 60), 0, 255))
            for y in range(rng.randint(0, step), h, step):
                draw.line((0, y, w, y), fill=line)
        return image
    sw, sh = w // 4 + 1, h // 4 + 1
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = x * math.cos(angle) + y * math.sin(angle)
    t = ((t - t.min()) / (np.ptp(t) + 1))[..., None]
    c0, c1 = np.array(nrng.integers(0, 256, 3)), np.array(nrng.integers(0, 256, 3))
    small = Image.fromarray((c0 + (c1 - c0) * t).astype(np.uint8))
    draw = ImageDraw.Draw(small)
    for _ in range(rng.randint(5, 16)):
        x0, x1 = sorted(rng.randint(-sw // 4, sw) for _ in range(2))
        y0, y1 = sorted(rng.randint(-sh // 4, sh) for _ in range(2))
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=fill)
    small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3)))
    return small.resize(size, Image.Resampling.BILINEAR)


def degrade(image: Image.Image, rng: random.Random, blur: float, noise: float) -> Image.Image:
    if blur:
        image = image.filter(ImageFilter.BoxBlur(blur))
    if noise:
        # Uniform grey grain through ImageChops: a few times cheaper than float arithmetic in numpy.
        amplitude = round(noise)
        grain = np.random.default_rng(rng.getrandbits(64)).integers(0, 2 * amplitude + 1, (image.height, image.width), np.uint8)
        image = ImageChops.add(image, Image.fromarray(grain).convert("RGB"), 1, -amplitude)
    return image


def random_degradation(rng: random.Random, font_size: int) -> tuple[float, float]:
    """(blur, noise): blur stays under a fraction of the glyph size so the text stays legible."""
    blur = rng.uniform(0.4, 1.2) * min(1.0, font_size / 32) if rng.random() < 0.3 else 0.0
    return blur, rng.randint(3, 10) if rng.random() < 0.4 else 0


# ---------------------------------------------------------------- text on a background


def random_style(rng: random.Random) -> TextStyle:
    background_style = rng.choices(BACKGROUNDS, (4, 3, 3))[0]
    r = rng.random()
    rotation = 0.0 if r < 0.4 else rng.uniform(-3, 3) if r < 0.75 else rng.uniform(-25, 25)
    # Small glyphs stay readable on plain paper but smear when rotated or on a busy background.
    size = rng.randint(24 if background_style == "photo" or abs(rotation) > 3 else MIN_FONT_SIZE, 72)
    return TextStyle(rng.choice(font_paths()), size, background_style, rotation, *random_degradation(rng, size))


def text_style(rng: random.Random, fonts=None, backgrounds=BACKGROUNDS, rotation: float = 0.0, size=(24, 64), blur=True) -> TextStyle:
    """A style from the given choices: fonts (default: all), backgrounds, a fixed rotation, a font size range."""
    font_size = rng.randint(*size)
    degradation = random_degradation(rng, font_size) if blur else (0.0, 0)
    return TextStyle(rng.choice(fonts or font_paths()), font_size, rng.choice(backgrounds), rotation, *degradation)


def _rotated_size(w: int, h: int, degrees: float) -> tuple[int, int]:
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    return math.ceil(w * c + h * s) + 2, math.ceil(w * s + h * c) + 2


def render_text(rng: random.Random, text: str, style: TextStyle) -> Image.Image:
    """`text` (lines split by newlines) in `style` at a random place on a canvas a little larger than the
    text; the font shrinks (not below MIN_FONT_SIZE) until the rotated text fits in MAX_SIDE."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    align = rng.choice(("left", "center", "right"))
    size = style.size
    while True:
        font = load_font(style.font, size)
        # A contrasting outline keeps text legible on busy photo-like backgrounds.
        stroke = max(1, size // 16) if style.background == "photo" else 0
        left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font, spacing=size // 4, align=align, stroke_width=stroke)
        if style.tracking and "\n" not in text:
            right += max(0.0, style.tracking) * size * len(text)
        pad = 2 + stroke + (size // 6 if style.effect else 0)  # room for a decoration's halo or side faces
        w, h = math.ceil(right - left) + 2 * pad, math.ceil(bottom - top) + 2 * pad
        rw, rh = _rotated_size(w, h, style.rotation)
        if max(rw, rh) <= MAX_SIDE - 8 or size == MIN_FONT_SIZE:
            break
        size = max(MIN_FONT_SIZE, int(size * 0.85))
    width = min(MAX_SIDE, max(MIN_SIDE, int(rw * rng.uniform(1.05, 1.8)) + 8))
    height = min(MAX_SIDE, max(MIN_SIDE, int(rh * rng.uniform(1.1, 3.0)) + 8))
    canvas = background(rng, (width, height), style.background)
    on_light = ImageStat.Stat(canvas.convert("L")).mean[0] > 128
    ink, outline = ink_colour(rng, on_light), ink_colour(rng, not on_light)

    # Drawn as grey masks, not an RGBA layer: rotating one channel is several times cheaper.
    def text_mask(stroke_width: int) -> Image.Image:
        mask = Image.new("L", (w, h))
        draw = ImageDraw.Draw(mask)
        if style.tracking and "\n" not in text:
            x = pad - left
            for ch in text:
                draw.text((x, pad - top), ch, font=font, fill=255, stroke_width=stroke_width, stroke_fill=255)
                x += font.getlength(ch) + style.tracking * size
        else:
            draw.multiline_text(
                (pad - left, pad - top),
                text,
                font=font,
                fill=255,
                spacing=size // 4,
                align=align,
                stroke_width=stroke_width,
                stroke_fill=255,
            )
        return mask.rotate(style.rotation, Image.Resampling.BILINEAR, expand=True) if style.rotation else mask

    if style.effect and style.effect != "outline":
        layers = word_art(rng, style.effect, text_mask(0), ink, outline, size)
    else:
        pairs = ((outline, stroke), (ink, 0)) if stroke else ((ink, 0),)
        layers = [(colour, text_mask(stroke_width)) for colour, stroke_width in pairs]
    layers = [(paint, mask.filter(ImageFilter.BoxBlur(style.blur)) if style.blur else mask) for paint, mask in layers]
    x = rng.randint(0, max(0, width - layers[0][1].width))
    y = rng.randint(0, max(0, height - layers[0][1].height))
    for paint, mask in layers:
        canvas.paste(paint, (x, y), mask)
    return degrade(canvas, rng, 0, style.noise)


# How word art decorates its letters: an outline in a second colour, the outline alone, side faces as if cut from a
# block, a soft halo, a grainy fill, bands of two colours. Their variety teaches reading through decorations never
# drawn (bench/effects_probe.py); the unseen renderer's two (gradient fills, drop shadows) are left out, so that set
# still tests such a decoration.
WORD_ART = ("outline", "hollow", "extruded", "glow", "textured", "striped")


def word_art(rng: random.Random, effect: str, mask: Image.Image, ink: tuple, other: tuple, size: int) -> list[tuple]:
    """The (paint, mask) layers, in paint order, that draw the letters of `mask` decorated by `effect` (WORD_ART);
    a paint is a colour or an image of the mask's size."""
    if effect == "hollow":
        return [(ink, hollow(mask, size))]
    if effect == "extruded":  # the side faces halfway between the two colours: apart from the letters and the scene
        dx, depth = rng.choice((-1, 1)), max(2, size // 10)
        sides = Image.new("L", mask.size)
        for k in range(depth, 0, -1):
            sides.paste(255, (dx * k, k), mask)
        return [(blend(ink, other, 0.5), sides), (ink, mask)]
    if effect == "glow":
        return [(other, mask.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.GaussianBlur(size / 10))), (ink, mask)]
    if effect == "textured":
        grain = np.random.default_rng(rng.randrange(2**32)).uniform(0.5, 1.0, (*mask.size[::-1], 1))
        return [(Image.fromarray((np.array(ink) * grain + np.array(other) * (1 - grain)).astype(np.uint8)), mask)]
    if effect == "striped":  # the second band a third of the way to the contrasting colour: both bands stand out
        bands, step = Image.new("RGB", mask.size, ink), max(2, size // rng.randint(5, 9))
        draw = ImageDraw.Draw(bands)
        for y in range(0, mask.height, 2 * step):
            draw.rectangle((0, y, mask.width, y + step - 1), fill=blend(ink, other, 1 / 3))
        return [(bands, mask)]
    raise ValueError(f"unknown word art effect {effect!r}: one of {WORD_ART}")


def hollow(mask: Image.Image, size: int) -> Image.Image:
    """A ring around the mask's strokes, thicker for larger letters: the letters drawn hollow."""
    return ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(3 + 2 * (size // 24))), mask)


def blend(a: tuple, b: tuple, t: float) -> tuple[int, ...]:
    """The colour `t` of the way from `a` to `b`."""
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def curve(image: Image.Image, rng: random.Random, strength: tuple[float, float] = (0.06, 0.14)) -> Image.Image:
    """Bend the image along a sine wave (each column shifted up or down by up to `strength` x its height), like text
    on a curved surface. The canvas grows by the amplitude at top and bottom (edge rows repeated), so nothing is
    pushed out of it."""
    amplitude = max(1, round(rng.uniform(*strength) * image.height))
    pixels = np.asarray(image)
    pixels = np.pad(pixels, ((amplitude, amplitude), (0, 0)) + ((0, 0),) * (pixels.ndim - 2), mode="edge")
    h, w = pixels.shape[:2]
    period, phase = rng.uniform(0.8, 2.0) * w, rng.uniform(0, 2 * np.pi)
    shift = np.round(amplitude * np.sin(2 * np.pi * np.arange(w) / period + phase)).astype(int)
    rows = np.clip(np.arange(h)[:, None] - shift[None, :], 0, h - 1)
    return Image.fromarray(pixels[rows, np.arange(w)[None, :]])


def render_irregular(rng: random.Random, text: str) -> Image.Image:
    """`text` rotated by 10-35 degrees and bent along a curve."""
    angle = rng.choice((-1, 1)) * rng.uniform(10, 35)
    return curve(render_text(rng, text, text_style(rng, rotation=angle, size=(32, 64))), rng)


def render_artistic(rng: random.Random, text: str) -> Image.Image:
    """`text` large, in a bold or slanted face, decorated as word art (WORD_ART) over a photo-like scene."""
    fancy = [p for p in font_paths() if p and any(k in Path(p).stem.lower() for k in ("bold", "italic", "oblique"))]
    style = text_style(rng, fancy, ("photo",), rng.uniform(-8, 8), (40, 72))
    return render_text(rng, text, replace(style, effect=rng.choice(WORD_ART)))


def place_on_background(rng: random.Random, paper: Image.Image, lines: list[Line]) -> tuple[Image.Image, list[Line]]:
    """A document as a flat scan, or photographed: slightly rotated on a textured or photo-like surface; returns the
    image and where its lines went."""
    if rng.random() < 0.4:
        return paper, lines
    degrees = rng.uniform(-5, 5)
    rotated = paper.convert("RGBA").rotate(degrees, Image.Resampling.BILINEAR, expand=True)
    lines = rotated_lines(lines, paper.size, degrees, rotated.size)
    width = min(MAX_SIDE, rotated.width + rng.randint(16, 160))
    height = min(MAX_SIDE, rotated.height + rng.randint(16, 160))
    canvas = background(rng, (width, height), rng.choice(("textured", "photo")))
    x, y = rng.randint(0, max(0, width - rotated.width)), rng.randint(0, max(0, height - rotated.height))
    canvas.paste(rotated, (x, y), rotated)
    return canvas, shifted_lines(lines, x, y)


# ---------------------------------------------------------------- texts


def word(rng: random.Random, vocab: Vocabulary) -> str:
    w = vocab.pick(rng, rng.choice((vocab.adjectives, vocab.nouns, vocab.verbs, vocab.first_names)))
    return rng.choice((str.lower, str.capitalize, str.upper))(w)


def handwritten_text(rng: random.Random, vocab: Vocabulary) -> str:
    """A word, a name or a short phrase, like IAM's handwritten words and lines."""
    r = rng.random()
    if r < 0.5:
        return word(rng, vocab)
    if r < 0.7:
        return person(rng, vocab)
    article = rng.choice(("The", "A", "My", "the", "a"))
    return f"{article} {vocab.pick(rng, vocab.adjectives)} {vocab.pick(rng, vocab.nouns)} {vocab.pick(rng, vocab.verbs)}"


def digits(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return " ".join(str(rng.randint(1000, 9999)) for _ in range(rng.randint(2, 4)))
    return str(rng.randint(0, 9)) + "".join(rng.choices("0123456789", k=rng.randint(2, 13)))


def random_string(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    if rng.random() < 0.3:
        return "-".join("".join(rng.choices(alphabet[:26] + alphabet[52:], k=4)) for _ in range(rng.randint(2, 4)))
    return "".join(rng.choices(alphabet, k=rng.randint(4, 14)))


def sentence(rng: random.Random) -> str:
    v = CORPUS_VOCABULARY
    a = f"{rng.choice(('The', 'A', 'My', 'Our', 'That'))} {v.pick(rng, v.adjectives)} {v.pick(rng, v.nouns)}"
    b = f"{rng.choice(('the', 'a', 'her', 'his', 'their'))} {v.pick(rng, v.adjectives)} {v.pick(rng, v.nouns)}"
    return f"{a} {v.pick(rng, v.verbs)} {b}{rng.choice(TAILS)}{rng.choice('..!')}"


def date(rng: random.Random) -> str:
    y, m, d = rng.randint(1950, 2025), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice((f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{MONTHS[m - 1]} {d}, {y}", f"{d:02d}.{m:02d}.{y}"))


def money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def math_term(rng: random.Random, symbols: list[str]) -> list:
    base = rng.choice(symbols) if rng.random() < 0.7 else str(rng.randint(1, 20))
    term = [("sup", base, [rng.choice(("2", "3", "n", rng.choice(symbols)))])] if rng.random() < 0.3 else [base]
    return [str(rng.randint(2, 9))] + term if rng.random() < 0.2 else term


def math_sum(rng: random.Random, symbols: list[str], terms: int) -> list:
    nodes = math_term(rng, symbols)
    for _ in range(terms - 1):
        nodes += [rng.choice("+-")] + math_term(rng, symbols)
    return nodes


def math_expression(rng: random.Random) -> list:
    """A small formula as layout nodes: tokens in LaTeX ("x", "2", "+", "\\alpha"), ("sup", base token, exponent),
    ("frac", numerator, denominator) and ("sqrt", body), where exponent, numerator, denominator and body are node lists."""
    symbols = MATH_LETTERS + (list(GREEK) if draw_greek(font_paths()) else [])
    r = rng.random()
    if r < 0.3:
        nodes = [("frac", math_sum(rng, symbols, rng.randint(1, 2)), math_sum(rng, symbols, rng.randint(1, 2)))]
    elif r < 0.45:
        nodes = [("sqrt", math_sum(rng, symbols, rng.randint(1, 2)))]
    else:
        nodes = math_sum(rng, symbols, rng.randint(2, 3))
    if r < 0.45 and rng.random() < 0.4:
        nodes += [rng.choice("+-")] + math_term(rng, symbols)
    return nodes + ["="] + math_sum(rng, symbols, rng.randint(1, 2)) if rng.random() < 0.6 else nodes


def latex(nodes: list) -> str:
    """The LaTeX of layout nodes, braces always written, as in HME100k: x^{2}, \\frac{a}{b}, \\sqrt{x}."""
    out = ""
    for node in nodes:
        if isinstance(node, str):
            part = node
        elif node[0] == "sup":
            part = f"{node[1]}^{{{latex(node[2])}}}"
        elif node[0] == "frac":
            part = rf"\frac{{{latex(node[1])}}}{{{latex(node[2])}}}"
        else:
            part = rf"\sqrt{{{latex(node[1])}}}"
        if re.search(r"\\[A-Za-z]+$", out) and part[0].isalpha():
            out += " "  # \alpha x, not \alphax
        out += part
    return out


TEXTS = {"word": lambda rng: word(rng, CORPUS_VOCABULARY), "digits": digits, "random": random_string, "sentence": sentence}


# ---------------------------------------------------------------- handwriting and formulas


# Writers who write in pen strokes (the optional kind "pen"): the centre lines of the Hershey vector faces (public
# domain; the hershey-fonts package), print and script, drawn with a round pen and each letter warped on its own.
# Outline fonts, however jittered, leave every letter a filled outline of a typeface; a pen leaves strokes of one
# width, as hands do.
PEN_FACES = ("futural", "futuram", "rowmans", "rowmand", "timesi", "scripts", "scriptc", "cursive")
HERSHEY_BASELINE, HERSHEY_CAP = 9, -12  # every PEN_FACES face's baseline and cap line, in its units (y down)


@dataclass(frozen=True)
class Hand:
    """Who writes: the letter shapes imitated (a font file, None for Pillow's built-in font), or drawn as pen strokes
    along a Hershey face's centre lines (`pen_face`; the font then draws only what that face lacks), and the pen."""

    font: str | None
    pen: int  # stroke width in pixels around the glyph outline (varied by one per letter), or a pen face's pen width
    pen_face: str | None = None
    width: float = 1.0  # how wide this writer draws a pen face's letters


def random_hand(rng: random.Random, size: int, pen: bool = False) -> Hand:
    """A writer imitating one of the corpus's fonts, or with `pen`, one writing in pen strokes."""
    if pen:
        width = rng.randint(max(2, size // 20), max(3, size // 9))  # a pen's width: the same for every letter it writes
        return Hand(rng.choice(font_paths()), width, rng.choice(PEN_FACES), rng.uniform(0.8, 1.25))
    return Hand(rng.choice(font_paths()), rng.randint(0, max(1, size // 24)))


@cache
def pen_glyphs(face: str) -> dict:
    """A Hershey face's glyphs by character (printable ASCII)."""
    fonts = HersheyFonts()
    fonts.load_default_font(face)
    return {ch: glyph for ch in map(chr, range(33, 127)) for glyph in fonts.glyphs_for_text(ch)}


def pen_letter(rng: random.Random, glyph, size: int, hand: Hand) -> tuple[Image.Image, tuple[int, int], float]:
    """A Hershey glyph drawn by `hand`'s pen at font size `size`: a grey mask, the point of it on the baseline at the
    letter's left, and the letter's advance. Each point moves along two smooth waves of the letter's own, so no two
    letters are drawn alike; drawn at twice the size and halved, for smooth edges."""
    scale = 0.7 * size / (HERSHEY_BASELINE - HERSHEY_CAP)  # a font's capitals stand ~0.7 of its size
    across, down = scale * hand.width, scale
    wave = size * rng.uniform(0.0, 0.035)
    amplitude, frequency, phase = (
        [rng.gauss(0, wave) for _ in "xy"],
        [rng.uniform(2, 5) / size for _ in "xy"],
        [rng.uniform(0, 6.3) for _ in "xy"],
    )
    pen, margin = hand.pen, hand.pen + size // 2
    width, height = round(glyph.char_width * across) + 2 * margin, round(size * 1.6) + 2 * margin
    origin = (margin, margin + round(size * 1.1))
    mask = Image.new("L", (2 * width, 2 * height))
    draw = ImageDraw.Draw(mask)
    for stroke in glyph.strokes:
        points = []
        for u, v in stroke:
            x, y = (u - glyph.left_offset) * across, (v - HERSHEY_BASELINE) * down
            x, y = x + amplitude[0] * math.sin(frequency[0] * y + phase[0]), y + amplitude[1] * math.sin(frequency[1] * x + phase[1])
            points.append((2 * (origin[0] + x), 2 * (origin[1] + y)))
        if len(points) > 1:
            draw.line(points, fill=255, width=2 * pen, joint="curve")
    return mask.resize((width, height), Image.Resampling.BOX), origin, glyph.char_width * across


def ink_line(rng: random.Random, text: str, hand: Hand, size: int) -> Image.Image:
    """`text` as one line of pen strokes, a grey mask with the baseline at 1.3 x size: each character at its own
    size, tilt, height and stroke weight, so no two letters look stamped from one font; a pen hand's letters drawn
    along its face's centre lines (`pen_letter`)."""
    height, baseline = round(size * 1.8), round(size * 1.3)
    line = Image.new("L", (round(size * (1.6 * len(text) + 0.5)), height))  # room for a wide pen hand's widest letters
    x = size // 8
    pen_glyph = pen_glyphs(hand.pen_face).get if hand.pen_face else lambda ch: None
    for ch in text:
        s = max(10, round(size * rng.uniform(0.85, 1.12)))
        if ch == " ":
            x += round(s * rng.uniform(0.3, 0.5))
            continue
        if (drawn := pen_glyph(ch)) is not None:
            glyph, origin, advance = pen_letter(rng, drawn, s, hand)
            glyph = glyph.rotate(rng.uniform(-6, 6), Image.Resampling.BILINEAR, center=origin)
            line.paste(255, (x - origin[0], baseline - origin[1] + round(rng.gauss(0, 0.04 * size))), glyph)
            x += round(advance * rng.uniform(0.9, 1.04))
            continue
        # An outline around the glyph's own strokes; a pen hand's letters its face lacks only a third of its pen
        stroke = max(0, (hand.pen // 3 if hand.pen_face else hand.pen) + rng.choice((-1, 0, 0, 1)))
        font = load_font(hand.font, s)
        glyph, origin = Image.new("L", (2 * s, 2 * s)), (s // 2, round(1.3 * s))
        ImageDraw.Draw(glyph).text(origin, ch, font=font, fill=255, anchor="ls", stroke_width=stroke, stroke_fill=255)
        glyph = glyph.rotate(rng.uniform(-8, 8), Image.Resampling.BILINEAR, center=origin)
        line.paste(255, (x - origin[0], baseline - origin[1] + round(rng.gauss(0, 0.04 * size))), glyph)
        x += round((font.getlength(ch) + stroke) * rng.uniform(0.88, 1.02))
    return line.crop((0, 0, x + size // 8, height))


def row(parts: list[tuple[Image.Image, int]], gap: int = 0) -> tuple[Image.Image, int]:
    """Masks side by side with their axes (a y in each) on one line; returns the mask and its axis."""
    above, below = max(axis for _, axis in parts), max(m.height - axis for m, axis in parts)
    out, x = Image.new("L", (sum(m.width for m, _ in parts) + gap * (len(parts) - 1), above + below)), 0
    for m, axis in parts:
        out.paste(m, (x, above - axis), m)
        x += m.width + gap
    return out, above


def ink_rows(mask: Image.Image) -> Image.Image:
    """The mask cut to its inked rows."""
    _, top, _, bottom = mask.getbbox()
    return mask.crop((0, top, mask.width, bottom))


def math_mask(rng: random.Random, nodes: list, hand: Hand, size: int) -> tuple[Image.Image, int]:
    """Pen-stroke mask of formula nodes (see `math_expression`) and the y of its maths axis (where a fraction bar sits)."""
    parts, line = [], max(2, size // 14)
    for node in nodes:
        if isinstance(node, str):  # ink_line's baseline is at 1.3 x size; the axis is 0.3 x size above it
            parts.append((ink_line(rng, GREEK.get(node, node), hand, size), size))
        elif node[0] == "sup":
            (exponent, axis), lift = math_mask(rng, node[2], hand, max(12, size * 13 // 20)), size * 11 // 20
            parts.append(row([math_mask(rng, [node[1]], hand, size), (exponent, axis + lift)]))
        elif node[0] == "frac":
            top, bottom = (ink_rows(math_mask(rng, part, hand, size * 4 // 5)[0]) for part in node[1:])
            width, gap = max(top.width, bottom.width) + size // 3, size // 6
            out = Image.new("L", (width, top.height + bottom.height + 2 * gap + line))
            out.paste(top, ((width - top.width) // 2, 0))
            bar = top.height + gap
            ends = (rng.randint(0, size // 8), bar + rng.randint(-1, 1), width - rng.randint(1, size // 8), bar)
            ImageDraw.Draw(out).line(ends, fill=255, width=line)
            out.paste(bottom, ((width - bottom.width) // 2, bar + line + gap), bottom)
            parts.append((out, bar))
        else:  # a radical sign, then an overline over the body
            body, axis = math_mask(rng, node[1], hand, size)
            hook, top = size // 2, size // 4
            out = Image.new("L", (body.width + hook + size // 6, body.height))
            tick = out.height * 0.55
            corners = [(0, tick), (hook * 0.35, tick - size // 10), (hook * 0.6, out.height - line), (hook, top), (out.width - 1, top)]
            ImageDraw.Draw(out).line(corners, fill=255, width=line, joint="curve")
            out.paste(body, (hook + size // 12, 0), body)
            parts.append((out, axis))
    return row(parts)


def slant(mask: Image.Image, shear: float) -> Image.Image:
    """Shear a mask: tops move right when `shear` > 0 (forward-leaning writing), left when < 0."""
    pad = math.ceil(abs(shear) * mask.height)
    data = (1, shear, -pad if shear > 0 else 0, 0, 1, 0)
    return mask.transform((mask.width + pad, mask.height), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)


def on_paper(rng: random.Random, mask: Image.Image, size: int) -> Image.Image:
    """A pen-stroke mask slanted and waved like a hand, in a pen's ink (at a pen's pressure) on plain or ruled paper."""
    mask = curve(slant(mask, rng.uniform(-0.1, 0.4)), rng, (0.01, 0.05))
    mask = mask.crop(mask.getbbox())
    mask.thumbnail((MAX_SIDE - 40, MAX_SIDE - 40))
    width = min(MAX_SIDE, max(MIN_SIDE, mask.width + rng.randint(24, 200)))
    height = min(MAX_SIDE, max(MIN_SIDE, mask.height + rng.randint(24, 160)))
    paper = Image.new("RGB", (width, height), light_colour(rng))
    if rng.random() < 0.5:
        draw, step, rule = ImageDraw.Draw(paper), round(size * rng.uniform(1.2, 1.6)), (rng.randint(150, 190), rng.randint(175, 210), 235)
        for y in range(rng.randint(0, step), height, step):
            draw.line((0, y, width, y), fill=rule)
    ink, pressure = tuple(max(0, c + rng.randint(-15, 15)) for c in rng.choice(PEN_INKS)), rng.uniform(0.75, 1.0)
    paper.paste(ink, (rng.randint(0, width - mask.width), rng.randint(0, height - mask.height)), mask.point(lambda v: v * pressure))
    return degrade(paper, rng, 0, rng.randint(2, 8) if rng.random() < 0.4 else 0)


def render_handwriting(rng: random.Random, text: str, pen: bool = False) -> Image.Image:
    """One handwritten word or line (see `ink_line` and `on_paper`), in pen strokes with `pen`."""
    size = rng.randint(28, 52)
    return on_paper(rng, ink_line(rng, text, random_hand(rng, size, pen), size), size)


def render_math(rng: random.Random, nodes: list) -> Image.Image:
    """A handwritten formula: stacked fractions, raised exponents and drawn radicals (see `math_mask`)."""
    size = rng.randint(32, 56)
    return on_paper(rng, math_mask(rng, nodes, random_hand(rng, size), size)[0], size)


# ---------------------------------------------------------------- samples


def text_sample(rng: random.Random, kind: str, tracking: float = 0.0) -> Rendered:
    """A word, number, random string or sentence (wrapped over a few lines) with one OCR question; `tracking`: see
    TextStyle."""
    text = TEXTS[kind](rng)
    lines = "\n".join(textwrap.wrap(text, rng.randint(14, 40))) if kind == "sentence" else text
    style = replace(random_style(rng), tracking=tracking)
    image = render_text(rng, lines, style)
    caption = rng.choice(TEXT_CAPTIONS).format(text=text, thing=THINGS[kind], bg=BG_WORDS[style.background], font=font_words(style.font))
    return Rendered(kind, image, caption, [(rng.choice(KIND_QUESTIONS[kind]), text)], None if kind == "sentence" else text)


def render_receipt(rng: random.Random, labelled: bool = False) -> tuple[Image.Image, dict, list[tuple[str, float]]]:
    """A till receipt; returns the image, its key information (store, date, items, subtotal, tax, total; with
    `labelled`, a number too, and labels that vary) and its lines (see Rendered.lines)."""
    fonts = [p for p in font_paths() if p and "mono" in Path(p).stem.lower()] or font_paths()
    font_path, size = rng.choice(fonts), rng.randint(MIN_FONT_SIZE, 20)
    font, head = load_font(font_path, size), load_font(font_path, size + rng.randint(2, 8))
    store = f"{rng.choice(SHOP_WORDS)} {rng.choice(SHOP_TYPES)}"
    items = {name: rng.randint(49, 2500) for name in rng.sample(ITEMS, rng.randint(2, 6))}
    subtotal = sum(items.values())
    rate = rng.choice((0, 5, 7, 8, 10, 20))
    tax = subtotal * rate // 100
    info = {
        "store": store,
        "date": date(rng),
        "items": {k: money(v) for k, v in items.items()},
        "subtotal": money(subtotal),
        "tax": money(tax),
        "total": money(subtotal + tax),
    }
    heading, total_label = [info["date"]], "TOTAL"
    if labelled:  # a number, labels that vary; the date stands bare half the time, as tills print it
        info["number"] = str(rng.randint(1000, 999999))
        case, end = rng.choice((str, str.upper)), rng.choice(LABEL_ENDS).rstrip()
        heading = [case(rng.choice(("Receipt No.", "No.", "Number", "Ref", "Trans", "Bill No."))) + end + " " + info["number"]]
        heading.append(info["date"] if rng.random() < 0.5 else case(rng.choice(("Date", "Dated", "Issued"))) + end + " " + info["date"])
        rng.shuffle(heading)
        total_label = case(rng.choice(("Total", "Total due", "Amount due", "Grand total", "Balance")))
    rows = [(name, price) for name, price in info["items"].items()]
    rows += [("", ""), ("SUBTOTAL", info["subtotal"])] + ([(f"TAX {rate}%", info["tax"])] if rate else []) + [(total_label, info["total"])]
    line_h, margin = int(size * 1.4), rng.randint(12, 24)
    text_w = max(font.getlength(a) + font.getlength(b) for a, b in rows) + 2 * size
    if labelled:
        text_w = max([text_w] + [font.getlength(text) + size for text in heading])
    width = max(int(text_w) + 2 * margin, rng.randint(220, 340), int(head.getlength(store)) + 2 * margin)
    height = 2 * margin + int(head.size * 1.5) + line_h * (len(rows) + 4 + len(heading))
    paper = Image.new("RGB", (width, height), light_colour(rng))
    draw, ink = ImageDraw.Draw(paper), ink_colour(rng, True)
    address, thanks = (
        f"{rng.randint(1, 200)} {rng.choice(STREETS)} Street",
        rng.choice(("THANK YOU!", "Thank you for shopping", "See you soon")),
    )
    y, lines = margin, []
    for text, line_font, skip in ((store, head, int(head.size * 1.5)), (address, font, line_h)):
        draw.text((width / 2, y), text, font=line_font, fill=ink, anchor="ma")
        lines.append(drawn_line((width / 2, y), text, line_font, "ma"))
        y += skip
    for text in heading:
        draw.text((margin, y), text, font=font, fill=ink)
        lines.append(drawn_line((margin, y), text, font))
        y += line_h
    rule = "-" * int((width - 2 * margin) / max(1, font.getlength("-")))
    for name, price in [("", "")] + rows:
        if not name:  # a rule is not text: its rows read nothing
            draw.text((margin, y), rule, font=font, fill=ink)
        else:
            draw.text((margin, y), name, font=font, fill=ink)
            draw.text((width - margin, y), price, font=font, fill=ink, anchor="ra")
            lines.append((f"{name} {price}", width / 2, drawn_line((margin, y), name, font)[2]))
        y += line_h
    draw.text((width / 2, y + line_h // 2), thanks, font=font, fill=ink, anchor="ma")
    lines.append(drawn_line((width / 2, y + line_h // 2), thanks, font, "ma"))
    image, lines = place_on_background(rng, paper, lines)
    return degrade(image, rng, *random_degradation(rng, size)), info, line_fractions(lines, image.size)


RECEIPT_ASKED = {  # the questions of a receipt's fields; "labelled" receipts' also in the words of other documents
    "total": ("What is the total?", "What is the total amount on this receipt?", "How much was paid in total?"),
    "date": ("What is the date on the receipt?", "When was this receipt issued?"),
}
LABELLED_ASKED = {
    "total": RECEIPT_ASKED["total"] + ("What is the total amount?",),
    "date": RECEIPT_ASKED["date"] + ("What is the date on the document?",),
    "number": ("What is the receipt number?", "What is the document number?", "Which number does this receipt have?"),
}


def receipt_sample(rng: random.Random, labelled: bool = False) -> Rendered:
    image, info, lines = render_receipt(rng, labelled)
    asked = LABELLED_ASKED if labelled else RECEIPT_ASKED
    item = rng.choice(list(info["items"]))
    qa = [
        (rng.choice(asked["total"]), info["total"]),
        (rng.choice(("What is the name of the store?", "Which shop issued this receipt?")), info["store"]),
        (rng.choice(asked["date"]), info["date"]),
        (f"What is the price of {item}?", info["items"][item]),
        ("What is the subtotal?", info["subtotal"]),
    ] + ([(rng.choice(asked["number"]), info["number"])] if labelled else [])
    caption = rng.choice(RECEIPT_CAPTIONS).format(store=info["store"], total=info["total"], date=info["date"], n=len(info["items"]))
    return Rendered("receipt", image, caption, rng.sample(qa, rng.randint(2, 3)), lines=lines)


FORM_FIELDS = {  # label on the form: (how a question names it, value generator)
    "Name": ("name", lambda r: f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}"),
    "Date of birth": ("date of birth", date),
    "Phone": ("phone number", lambda r: f"+{r.randint(1, 49)} {r.randint(100, 999)} {r.randint(1000000, 9999999)}"),
    "Email": (
        "email address",
        lambda r: f"{r.choice(FIRST_NAMES).lower()}.{r.choice(LAST_NAMES).lower()}@{r.choice(('mail', 'post', 'inbox'))}.com",
    ),
    "City": ("city", lambda r: r.choice(CITIES)),
    "Postcode": ("postcode", lambda r: str(r.randint(10000, 99999))),
    "Customer ID": ("customer ID", lambda r: f"C-{r.randint(100000, 999999)}"),
    "Invoice No.": ("invoice number", lambda r: str(r.randint(1000, 99999))),
    "Amount due": ("amount due", lambda r: money(r.randint(500, 250000))),
    "Date": ("date", date),
}
FORM_TITLES = {
    "REGISTRATION FORM": "registration form",
    "APPLICATION FORM": "application form",  # heading: in captions
    "CUSTOMER DETAILS": "customer details form",
    "INVOICE": "invoice",
    "DELIVERY NOTE": "delivery note",
}


def render_form(rng: random.Random, labelled: bool = False) -> tuple[Image.Image, str, dict[str, str], list[tuple[str, float]]]:
    """A filled-in form: a title, then label/value fields (values in another font and ink, on lines or in
    boxes; with `labelled`, the labels' case and ends vary); returns the image, the title, the field values by label and the lines (see Rendered.lines)."""
    title = rng.choice(list(FORM_TITLES))
    fields = {label: FORM_FIELDS[label][1](rng) for label in ["Name"] + rng.sample(list(FORM_FIELDS)[1:], rng.randint(2, 5))}
    size = rng.randint(MIN_FONT_SIZE, 22)
    label_font = load_font(rng.choice(font_paths()), size)
    value_font = load_font(rng.choice(font_paths()), size + rng.randint(0, 4))
    title_font = load_font(rng.choice(font_paths()), size + rng.randint(6, 12))
    margin, boxed = rng.randint(16, 32), rng.random() < 0.5
    case, end = (rng.choice((str, str.upper)), rng.choice(LABEL_ENDS).rstrip()) if labelled else (str, ":")
    shown = {label: case(label) + end for label in fields}
    label_w = max(label_font.getlength(shown[k]) for k in fields) + size
    value_w = max(value_font.getlength(v) for v in fields.values()) + size
    width = max(int(label_w + value_w) + 2 * margin, int(title_font.getlength(title)) + 2 * margin, rng.randint(360, 560))
    row_h = int(value_font.size * 2.2)
    height = 2 * margin + int(title_font.size * 2) + row_h * len(fields)
    page = Image.new("RGB", (width, height), light_colour(rng))
    draw = ImageDraw.Draw(page)
    ink, pen = ink_colour(rng, True), rng.choice(((20, 30, 140), (10, 10, 10), (30, 60, 160), (120, 20, 20)))
    draw.text((margin, margin), title, font=title_font, fill=ink)
    lines = [drawn_line((margin, margin), title, title_font)]
    y = margin + int(title_font.size * 2)
    for label, value in fields.items():
        lines.append((f"{shown[label]} {value}", width / 2, y + row_h // 2))
        x = margin + label_w
        draw.text((margin, y + row_h // 2), shown[label], font=label_font, fill=ink, anchor="lm")
        if boxed:
            draw.rectangle((x - 6, y + 3, width - margin, y + row_h - 3), outline=ink)
        else:
            draw.line((x - 4, y + row_h - 6, width - margin, y + row_h - 6), fill=ink)
        draw.text((x, y + row_h // 2), value, font=value_font, fill=pen, anchor="lm")
        y += row_h
    image, lines = place_on_background(rng, page, lines)
    return degrade(image, rng, *random_degradation(rng, size)), title, fields, line_fractions(lines, image.size)


def form_sample(rng: random.Random, labelled: bool = False) -> Rendered:
    image, title, fields, lines = render_form(rng, labelled)
    qa = []
    for label in rng.sample(list(fields), min(len(fields), rng.randint(2, 3))):
        phrase = FORM_FIELDS[label][0]
        question = rng.choice(
            (f"What is the {phrase} on the form?", f"What is written in the '{label}' field?", f"What {phrase} is given in this document?")
        )
        qa.append((question, fields[label]))
    caption = rng.choice(FORM_CAPTIONS).format(title=FORM_TITLES[title], name=fields["Name"], n=len(fields))
    return Rendered("form", image, caption, qa, lines=lines)


def person(rng: random.Random, vocab: Vocabulary) -> str:
    return f"{vocab.pick(rng, vocab.first_names)} {vocab.pick(rng, vocab.last_names)}"


def render_memo(
    rng: random.Random, vocab: Vocabulary, labelled: bool = False
) -> tuple[Image.Image, dict[str, str], list[tuple[str, float]]]:
    """A memo: title, a To/From/Date/Subject header and a short body, scanned or photographed; with `labelled`, the
    header's labels, their order and alignment vary, and the body may name another person and date. Returns the
    image, the header by field (the keys of MEMO_QUESTIONS) and the lines (see Rendered.lines)."""
    topic = rng.choice(("plan", "schedule", "update", "budget"))
    header = {
        "To": person(rng, vocab),
        "From": person(rng, vocab),
        "Date": date(rng),
        "Subject": f"{vocab.pick(rng, vocab.adjectives).capitalize()} {vocab.pick(rng, vocab.nouns)} {topic}",
    }
    rows = [(f"{field}:", value) for field, value in header.items()]
    if labelled:
        fields = list(header) if rng.random() < 0.5 else rng.sample(list(header), len(header))
        case, end = rng.choice((str, str.upper)), rng.choice(LABEL_ENDS).rstrip()
        rows = [(case(rng.choice(MEMO_LABELS[field])) + end, header[field]) for field in fields]
    body = [
        f"The {rng.choice(vocab.adjectives)} {rng.choice(vocab.nouns)} team {rng.choice(vocab.verbs)} every {rng.choice(vocab.nouns)} "
        f"before the {rng.choice(vocab.nouns)} {rng.choice(('review', 'deadline', 'launch', 'audit'))}."
        for _ in range(rng.randint(0 if labelled else 2, 3))
    ]
    if labelled and rng.random() < 0.5:  # a name and a date outside the header: only its labels tell which one is asked
        body.append(f"Please send comments to {person(rng, vocab)} by {date(rng)}.")
    size = rng.randint(MIN_FONT_SIZE, 22)
    font, title_font = load_font(rng.choice(font_paths()), size), load_font(rng.choice(font_paths()), size + rng.randint(6, 12))
    wrap = rng.randint(34, 48)
    text = [line for s in body for line in textwrap.wrap(s, wrap)]
    # Values in a column of their own half the time, as a tab stop sets them; else each after its label.
    tab = max(font.getlength(label) for label, _ in rows) + size if labelled and rng.random() < 0.5 else 0
    starts = [max(tab, font.getlength(label + " ")) for label, _ in rows]  # each value's, from the margin
    margin, line_h = rng.randint(16, 32), int(size * 1.5)
    rights = [x + font.getlength(v) if tab else font.getlength(f"{label} {v}") for x, (label, v) in zip(starts, rows)]
    width = int(max([font.getlength(line) for line in text] + rights) + 2 * margin)
    height = 2 * margin + 2 * title_font.size + line_h * (len(rows) + 1 + len(text))
    page = Image.new("RGB", (min(width, MAX_SIDE), min(height, MAX_SIDE)), light_colour(rng))
    draw, ink, title = ImageDraw.Draw(page), ink_colour(rng, True), rng.choice(LABELLED_MEMO_TITLES if labelled else MEMO_TITLES)
    draw.text((margin, margin), title, font=title_font, fill=ink)
    drawn = [drawn_line((margin, margin), title, title_font)]
    y = margin + 2 * title_font.size
    for start, right, (label, value) in zip(starts, rights, rows):
        if tab:
            draw.text((margin, y), label, font=font, fill=ink)
            draw.text((margin + start, y), value, font=font, fill=ink)
        else:
            draw.text((margin, y), f"{label} {value}", font=font, fill=ink)
        # A line the page cuts off on the right would be a transcript the image does not show.
        if margin + right <= page.width and y + size <= page.height:
            line = drawn_line((margin, y), f"{label} {value}", font)
            drawn.append((line[0], margin + right / 2, line[2]) if tab else line)  # a tabbed row spans label to value
        y += line_h
    y += line_h
    for line in text:
        draw.text((margin, y), line, font=font, fill=ink)
        if margin + font.getlength(line) <= page.width and y + size <= page.height:
            drawn.append(drawn_line((margin, y), line, font))
        y += line_h
    image, drawn = place_on_background(rng, page, drawn)
    return degrade(image, rng, *random_degradation(rng, size)), header, line_fractions(drawn, image.size)


def render_sign(rng: random.Random, vocab: Vocabulary) -> tuple[Image.Image, dict[str, str], list[tuple[str, float]]]:
    """A shop sign on a photo-like scene; returns the image, its name, founding year and opening hours (the keys
    of SIGN_QUESTIONS) and its lines (see Rendered.lines)."""
    name = f"{vocab.pick(rng, vocab.adjectives + vocab.nouns).capitalize()} {vocab.pick(rng, vocab.shop_types)}"
    info = {"name": name, "year": str(rng.randint(1890, 2020)), "hours": f"{rng.randint(6, 10)}:00-{rng.randint(17, 23)}:00"}
    lines = [name.upper() if rng.random() < 0.5 else name, f"EST. {info['year']}", f"OPEN {info['hours']}"]
    size = rng.randint(24, 44)
    font, small = load_font(rng.choice(font_paths()), size), load_font(rng.choice(font_paths()), max(MIN_FONT_SIZE, size * 2 // 3))
    pad = size // 2
    sign_w = int(max(font.getlength(lines[0]), small.getlength(lines[2])) + 2 * pad)
    sign_h = int(size * 1.4 + 2 * small.size * 1.4 + 2 * pad)
    board = paper_colour(rng)
    ink = ink_colour(rng, sum(board) / 3 > 128)
    sign = Image.new("RGB", (sign_w, sign_h), board)
    draw = ImageDraw.Draw(sign)
    draw.rectangle((2, 2, sign_w - 3, sign_h - 3), outline=ink, width=2)
    drawn = []
    for text, line_font, y in (
        (lines[0], font, pad),
        (lines[1], small, pad + size * 1.4),
        (lines[2], small, pad + size * 1.4 + small.size * 1.4),
    ):
        draw.text((sign_w / 2, y), text, font=line_font, fill=ink, anchor="ma")
        drawn.append(drawn_line((sign_w / 2, y), text, line_font, "ma"))
    degrees = rng.uniform(-6, 6)
    rotated = sign.convert("RGBA").rotate(degrees, Image.Resampling.BILINEAR, expand=True)
    drawn = rotated_lines(drawn, sign.size, degrees, rotated.size)
    width = min(MAX_SIDE, rotated.width + rng.randint(60, 300))
    height = min(MAX_SIDE, rotated.height + rng.randint(60, 300))
    scene = background(rng, (width, height), "photo")
    x, y = rng.randint(0, max(0, width - rotated.width)), rng.randint(0, max(0, height - rotated.height))
    scene.paste(rotated, (x, y), rotated)
    return degrade(scene, rng, *random_degradation(rng, size)), info, line_fractions(shifted_lines(drawn, x, y), scene.size)


def memo_sample(rng: random.Random, labelled: bool = False) -> Rendered:
    image, header, lines = render_memo(rng, CORPUS_VOCABULARY, labelled)
    caption = rng.choice(MEMO_CAPTIONS).format(by=header["From"], to=header["To"], subject=header["Subject"].lower(), date=header["Date"])
    qa = [(rng.choice(MEMO_ASKED[k]) if labelled else MEMO_QUESTIONS[k], header[k]) for k in rng.sample(list(header), rng.randint(2, 3))]
    return Rendered("memo", image, caption, qa, lines=lines)


def sign_sample(rng: random.Random) -> Rendered:
    image, info, lines = render_sign(rng, CORPUS_VOCABULARY)
    # The name as the sign prints it, capitals and all: an answer re-cased from the glyphs is a second task the reader
    # learns on the corpus's own names and fails on others' (bench/BENCHMARKS.md); the report's rule ignores case.
    info = {**info, "name": lines[0][0]}
    caption = rng.choice(SIGN_CAPTIONS).format(**info)
    return Rendered("sign", image, caption, [(SIGN_QUESTIONS[k], info[k]) for k in rng.sample(list(info), rng.randint(2, 3))], lines=lines)


DRAWN_RENDERERS = {
    "curved": render_irregular,
    "artistic": render_artistic,
    "handwriting": render_handwriting,
    "pen": partial(render_handwriting, pen=True),
}


def drawn_sample(rng: random.Random, kind: str) -> Rendered:
    """A curved, artistic or handwritten word or phrase, or a handwritten formula, with one question."""
    if kind == "math":
        nodes = math_expression(rng)
        text, image, question = latex(nodes), render_math(rng, nodes), rng.choice(MATH_QUESTIONS)
    else:
        text = handwritten_text(rng, CORPUS_VOCABULARY) if kind in ("handwriting", "pen") else word(rng, CORPUS_VOCABULARY)
        image = DRAWN_RENDERERS[kind](rng, text)
        question = rng.choice(KIND_QUESTIONS[kind])
    transcript = None if kind == "math" else text  # a formula's answer is LaTeX, not the line as drawn
    return Rendered(kind, image, rng.choice(DRAWN_CAPTIONS[kind]).format(text=text), [(question, text)], transcript)


# Reading genres first: they are what OCR needs most and what most of the eval set asks.
KINDS = {
    "word": 14,
    "digits": 10,
    "random": 10,
    "sentence": 8,
    "handwriting": 14,
    "curved": 10,
    "artistic": 6,
    "math": 8,
    "receipt": 7,
    "form": 7,
    "memo": 6,
    "sign": 6,
    "rotated": 6,  # widened.py's: text turned up to a quarter turn
    "scene": 8,  # widened.py's: words photographed on a scene
}
# Kinds a corpus draws only where its settings name them, until a GPU run shows they pay (bench/BENCHMARKS.md).
# widened.py's words set letter by letter along a bow; handwriting in pen strokes; memos, receipts and forms whose
# labels vary (see MEMO_LABELS)
OPTIONAL_KINDS = ("arched", "pen", "labelled")


def labelled_sample(rng: random.Random) -> Rendered:
    make = rng.choices((memo_sample, receipt_sample, form_sample), (KINDS["memo"], KINDS["receipt"], KINDS["form"]))[0]
    return replace(make(rng, labelled=True), kind="labelled")


DOCUMENTS = {"receipt": receipt_sample, "form": form_sample, "memo": memo_sample, "sign": sign_sample, "labelled": labelled_sample}


def make_sample(seed: int, index: int, kinds: dict[str, float] = KINDS, letter_spacing: bool = False, photos: float = 0.0) -> Rendered:
    """Sample `index` of the corpus drawn from `seed` and `kinds` (weights of KINDS' kinds), with letters spread or
    squeezed when `letter_spacing`, photographed with probability `photos` (see CorpusSettings): a pure function of
    them, whatever process runs it."""
    rendered = drawn(seed, index, kinds, letter_spacing)
    # Its own stream, as the letter spacing's: changing `photos` leaves every other draw of the corpus as it was.
    camera = random.Random(f"{seed}:{index}:photo")
    if camera.random() < photos:
        size = rendered.image.size
        rendered.image, forward = photo.photograph(rendered.image, camera)
        if rendered.lines:
            rendered.lines = photo.photographed_lines(rendered.lines, forward, size)
    return rendered


def drawn(seed: int, index: int, kinds: dict[str, float], letter_spacing: bool) -> Rendered:
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices(list(kinds), list(kinds.values()))[0]
    if kind in DOCUMENTS:
        return DOCUMENTS[kind](rng)
    if kind in DRAWN_CAPTIONS:
        return drawn_sample(rng, kind)
    if kind in ("rotated", "scene", "arched"):
        from beni_pipeline.prep import widened  # it builds on this module's renderers, so it imports this one

        return widened.SAMPLES[kind](rng)
    # Its own stream: switching letter spacing on or off leaves every other draw of the corpus as it was.
    spacing = random.Random(f"{seed}:{index}:spacing")
    tracking = spacing.uniform(-0.05, 0.5) if letter_spacing and kind != "sentence" and spacing.random() < 0.5 else 0.0
    return text_sample(rng, kind, tracking)


def conversations(qa: list[tuple[str, str]]) -> list[dict]:
    turns = []
    for i, (question, answer) in enumerate(qa):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question}, {"from": "gpt", "value": answer}]
    return turns


def jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def edit_caption(rng: random.Random, caption: str) -> str:
    """A light edit outside the quoted text: the final full stop, the first letter's case, or one template word."""
    head = caption.split('"')[0]
    swappable = [w for w in SYNONYMS if re.search(rf"\b{re.escape(w)}(?=\s|$)", head)]
    edit = rng.choice(["punctuation", "case"] + (["word"] if swappable else []))
    if edit == "punctuation":
        return caption[:-1] if caption.endswith(".") else caption + "."
    if edit == "case":
        return caption[0].swapcase() + caption[1:]
    w = rng.choice(swappable)
    return re.sub(rf"\b{re.escape(w)}(?=\s|$)", SYNONYMS[w], head, count=1) + caption[len(head) :]


def near_duplicate(seed: int, index: int, original: Rendered) -> tuple[bytes, str, str]:
    """(JPEG bytes, change, caption) of a resized or re-encoded copy of `original`'s JPEG file."""
    rng = random.Random(f"{seed}:{index}:duplicate")
    image = Image.open(io.BytesIO(jpeg(original.image)))
    if rng.random() < 0.5:
        scale = rng.uniform(0.6, 0.9)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        data, change = jpeg(image), "resize"
    else:
        data, change = jpeg(image, rng.randint(60, 80)), "reencode"
    caption = edit_caption(rng, original.caption) if rng.random() < 0.5 else original.caption
    return data, change, caption


# ---------------------------------------------------------------- the corpus on disk


def plant_duplicates(settings: CorpusSettings) -> dict[int, int]:
    """{duplicate index: index of the earlier, original sample it copies}."""
    n = settings.samples
    rng = random.Random(f"{settings.seed}:duplicates")
    planted = sorted(rng.sample(range(1, n), min(n - 1, round(n * settings.duplicate_fraction))))
    chosen = set(planted)
    originals = {}
    for i in planted:
        original = rng.randrange(i)
        while original in chosen:  # terminates: sample 0 is never a duplicate
            original = rng.randrange(i)
        originals[i] = original
    return originals


def _write_chunk(task: tuple[CorpusSettings, range, dict[int, int], str, int]) -> list[tuple[str, str | None]]:
    """Render and write one chunk's images; return its corpus.jsonl lines (and planted_duplicates.jsonl lines)."""
    settings, indices, duplicates, images, width = task
    with using_fonts(settings.fonts):
        return [_write_sample(settings, i, duplicates, images, width) for i in indices]


def _write_sample(settings: CorpusSettings, i: int, duplicates: dict[int, int], images: str, width: int) -> tuple[str, str | None]:
    seed, kinds = settings.seed, settings.kinds
    url = f"images/{i:0{width}d}.jpg"
    if i in duplicates:
        original = make_sample(seed, duplicates[i], kinds, settings.letter_spacing, settings.photos)
        data, change, caption = near_duplicate(seed, i, original)
        of = f"images/{duplicates[i]:0{width}d}.jpg"
        planted = json.dumps({"url": url, "duplicate_of": of, "change": change, "caption_edit": caption != original.caption})
    else:
        original = make_sample(seed, i, kinds, settings.letter_spacing, settings.photos)
        data, caption, planted = jpeg(original.image), original.caption, None
    Path(images, url.removeprefix("images/")).write_bytes(data)
    row = {"url": url, "caption": caption, "conversations": conversations(original.qa), "kind": original.kind}
    if original.transcript:
        row["transcript"] = original.transcript
    if original.lines:
        row["lines"] = original.lines
    return json.dumps(row, ensure_ascii=False), planted


def corpus_fonts_of(out_dir: Path) -> tuple[str, ...] | None:
    """The fonts the complete corpus in out_dir was drawn with (CorpusSettings.fonts), or None when there is none."""
    marker = Path(out_dir) / "corpus_settings.json"
    return tuple(json.loads(marker.read_text())["fonts"]) if marker.is_file() else None


def generate_corpus(out_dir: Path, settings: CorpusSettings = CorpusSettings()) -> Path:
    """Writes out_dir/images/<name>.jpg, out_dir/corpus.jsonl and out_dir/planted_duplicates.jsonl; returns the
    corpus.jsonl path. Returns at once if out_dir already holds a complete corpus for the same settings
    (corpus_settings.json, written last with the settings and FORMAT, marks completion); otherwise images/ is emptied and all is regenerated."""
    if settings.samples < 1 or not 0 <= settings.duplicate_fraction < 1 or not 0 <= settings.photos <= 1:
        raise ValueError(f"corpus settings need samples >= 1, 0 <= duplicate_fraction < 1 and 0 <= photos <= 1; got {settings}")
    if unknown := set(settings.kinds) - set(KINDS) - set(OPTIONAL_KINDS):
        raise ValueError(
            f"corpus kinds {sorted(unknown)} are not among {sorted([*KINDS, *OPTIONAL_KINDS])}: name kinds the corpus can draw."
        )
    if not settings.kinds or min(settings.kinds.values()) <= 0:
        raise ValueError(f"corpus kinds need at least one kind and weights above 0; got {settings.kinds}")
    out_dir = Path(out_dir)
    corpus, planted, marker = out_dir / "corpus.jsonl", out_dir / "planted_duplicates.jsonl", out_dir / "corpus_settings.json"
    wanted = json.dumps({**asdict(settings), "format": FORMAT}, sort_keys=True) + "\n"
    if marker.is_file() and marker.read_text() == wanted and corpus.is_file() and planted.is_file():
        return corpus
    marker.unlink(missing_ok=True)
    for path in (corpus, planted, marker):
        remove_leftovers(path)
    images = out_dir / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    duplicates = plant_duplicates(settings)
    width = max(6, len(str(settings.samples - 1)))
    tasks = []
    for start in range(0, settings.samples, CHUNK):
        indices = range(start, min(start + CHUNK, settings.samples))
        tasks.append((settings, indices, {i: duplicates[i] for i in indices if i in duplicates}, str(images), width))
    with (
        process_pool(min(os.cpu_count() or 1, len(tasks))) as pool,
        atomic_path(corpus) as corpus_tmp,
        atomic_path(planted) as planted_tmp,
        corpus_tmp.open("w") as rows,
        planted_tmp.open("w") as dups,
    ):
        for lines in pool.map(_write_chunk, tasks):
            for row, dup in lines:
                rows.write(row + "\n")
                if dup:
                    dups.write(dup + "\n")
    write_text_atomic(marker, wanted)  # last: the marker says the corpus is complete
    return corpus
