"""The unseen-renderer eval set: OCRBench's format and categories (plus rotated text), drawn by code that shares
nothing visual with the training corpus. Its fonts come only from the `unseen` font packages (fonts.py); its layouts
(labels, arcs, tickets, letters, shop fronts), backgrounds (stripes, dots, fractal noise, wood grain), colour schemes
(hue-paired paper and ink, light on dark), noise (Gaussian, salt and pepper) and camera (perspective, Gaussian or
motion blur, uneven light, heavy JPEG) are its own; none of synthetic.py's or widened.py's renderers is called. Only
the texts come from elsewhere: ocr_eval.py's held-out vocabulary and synthetic.py's generators of digit strings, codes
and formulas, none of them visual.

A score here against the same-generator set (ocr_eval.py) measures how much of a model's reading is reading, and how
much is having learned the corpus's fonts and layouts.

Over 400 lines because it is a second renderer on purpose: every layout, background, colour scheme and camera
effect here must be its own code (sharing one with synthetic.py would make the set less unseen), each a few lines.
"""

import colorsys
import io
import math
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from beni_pipeline.prep import ocr_eval
from beni_pipeline.prep import synthetic as syn
from beni_pipeline.prep.fonts import MANIFEST, corpus_fonts, split_fonts

MAX_SIDE = 640
MIN_CONTRAST = 100  # of ink against paper, in grey levels


@dataclass(frozen=True)
class Fonts:
    any: tuple[str, ...]
    hand: tuple[str, ...]  # handwriting-like faces
    mono: tuple[str, ...]

    @classmethod
    def unseen(cls, root) -> "Fonts":
        return cls(split_fonts(root, "unseen"), split_fonts(root, "unseen", "hand"), split_fonts(root, "unseen", "mono"))


def font(rng: random.Random, paths: tuple[str, ...], size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(rng.choice(paths), size)


# ---------------------------------------------------------------- colour, backgrounds, camera


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h % 1, s, v))


def luminance(colour: tuple[int, int, int]) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def palette(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(paper, ink): tinted paper with ink of the opposite hue, saturated paper with white ink, or neon on near-black;
    redrawn until ink and paper differ in brightness enough to read (blue on black does not)."""
    while True:
        paper, ink = colours(rng)
        if abs(luminance(paper) - luminance(ink)) >= MIN_CONTRAST:
            return paper, ink


def colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    h, scheme = rng.random(), rng.choice(("tinted", "saturated", "neon"))
    if scheme == "tinted":
        return hsv(h, rng.uniform(0.1, 0.35), rng.uniform(0.85, 1)), hsv(h + 0.5, rng.uniform(0.5, 1), rng.uniform(0.1, 0.35))
    if scheme == "saturated":
        return hsv(h, rng.uniform(0.6, 1), rng.uniform(0.3, 0.55)), hsv(h, rng.uniform(0, 0.1), rng.uniform(0.92, 1))
    return hsv(h, rng.uniform(0.3, 0.8), rng.uniform(0.03, 0.15)), hsv(h + rng.uniform(0.2, 0.8), rng.uniform(0.6, 1), 1.0)


def shade(colour: tuple[int, int, int], by: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + by)) for c in colour)


def pattern(rng: random.Random, size: tuple[int, int], base: tuple[int, int, int]) -> Image.Image:
    """Stripes, dots, fractal noise or wood grain around `base`, faint enough for ink to read over it."""
    w, h = size
    kind = rng.choice(("stripes", "dots", "fractal", "wood"))
    image = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(image)
    if kind == "stripes":
        step, other = rng.randint(10, 30), shade(base, rng.choice((-22, 22)))
        for x in range(-h, w, step):
            draw.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 + h, h), (x + h, h)], fill=other)
    elif kind == "dots":
        step, r, other = rng.randint(14, 34), rng.randint(2, 6), shade(base, rng.choice((-25, 25)))
        for y in range(0, h, step):
            for x in range((y // step % 2) * step // 2, w, step):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=other)
    else:
        nrng = np.random.default_rng(rng.getrandbits(64))
        if kind == "fractal":  # octaves of value noise, each twice as fine and half as strong
            field = sum(
                np.asarray(
                    Image.fromarray(nrng.random((h // s + 2, w // s + 2)).astype(np.float32)).resize((w, h), Image.Resampling.BICUBIC)
                )
                / (i + 1)
                for i, s in enumerate((64, 32, 16, 8))
            )
        else:
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            field = np.sin((y + 8 * np.sin(x / rng.uniform(30, 80))) / rng.uniform(2, 6))
        field = (field - field.mean()) / (field.std() + 1e-6)
        pixels = np.asarray(image, np.float32) + field[..., None] * rng.uniform(6, 14)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def perspective(image: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    """A homography that moves the corners by up to `strength` of the image's sides (solved for PIL's 8 coefficients)."""
    w, h = image.size
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    moved = [(x + rng.uniform(-strength, strength) * w, y + rng.uniform(-strength, strength) * h) for x, y in corners]
    rows = []
    for (x, y), (u, v) in zip(corners, moved):  # maps output (u, v) back to input (x, y)
        rows.append([u, v, 1, 0, 0, 0, -x * u, -x * v])
        rows.append([0, 0, 0, u, v, 1, -y * u, -y * v])
    coefficients = np.linalg.solve(np.array(rows, float), np.array([c for xy in corners for c in xy], float))
    edge = image.getpixel((w // 2, 0))
    return image.transform(image.size, Image.Transform.PERSPECTIVE, tuple(coefficients), Image.Resampling.BICUBIC, fillcolor=edge)


_camera_on = True  # off inside `without_camera`


@contextmanager
def without_camera():
    """Renderers inside the block return their images as drawn, not photographed. `camera` still makes its random
    draws, so every item keeps its text and question: the two sets differ only by the photo effects."""
    global _camera_on
    previous, _camera_on = _camera_on, False
    try:
        yield
    finally:
        _camera_on = previous


def camera(image: Image.Image, rng: random.Random, strength: float = 0.06) -> Image.Image:
    """A phone photo of `image`: perspective, Gaussian or motion blur, a light spot and dark corners, sensor noise (or
    salt and pepper), then heavy JPEG."""
    drawn, image = image, perspective(image, rng, strength)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    else:  # a short horizontal or vertical smear
        n = rng.choice((3, 5))
        kernel = [1 / n if (i // n == n // 2 if rng.random() < 0.5 else i % n == n // 2) else 0 for i in range(n * n)]
        image = image.filter(ImageFilter.Kernel((n, n), kernel, 1))
    w, h = image.size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    distance = np.hypot((x - cx) / w, (y - cy) / h)
    light = rng.uniform(1.0, 1.15) - rng.uniform(0.3, 0.6) * distance
    pixels = np.asarray(image, np.float32) * light[..., None]
    nrng = np.random.default_rng(rng.getrandbits(64))
    if rng.random() < 0.7:
        pixels += nrng.normal(0, rng.uniform(3, 9), pixels.shape)
    else:
        flips = nrng.random(pixels.shape[:2])
        pixels[flips < 0.004], pixels[flips > 0.996] = 0, 255
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randint(25, 60))
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB") if _camera_on else drawn


def fit(image: Image.Image) -> Image.Image:
    image = image.copy()
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


# ---------------------------------------------------------------- one line of text


def text_mask(text: str, face: ImageFont.FreeTypeFont, pad: int = 4) -> Image.Image:
    left, top, right, bottom = face.getbbox(text)
    mask = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(mask).text((pad - left, pad - top), text, font=face, fill=255)
    return mask


def label(rng: random.Random, text: str, faces: tuple[str, ...], angle: float = 0.0) -> Image.Image:
    """`text` on a rounded card with a border, laid on a patterned surface at `angle` degrees, photographed."""
    paper, ink = palette(rng)
    mask = text_mask(text, font(rng, faces, rng.randint(26, 54)))
    margin = rng.randint(8, 24)
    card = Image.new("RGBA", (mask.width + 2 * margin, mask.height + 2 * margin))
    ImageDraw.Draw(card).rounded_rectangle(
        (0, 0, card.width - 1, card.height - 1), radius=margin, fill=paper, outline=shade(ink, 30), width=2
    )
    card.paste(ink, (margin, margin), mask)
    card = card.rotate(angle, Image.Resampling.BICUBIC, expand=True)
    surface = pattern(rng, (card.width + rng.randint(30, 160), card.height + rng.randint(30, 160)), palette(rng)[0])
    surface.paste(card, (rng.randint(0, surface.width - card.width), rng.randint(0, surface.height - card.height)), card)
    return camera(fit(surface), rng)


def arc(rng: random.Random, text: str, faces: tuple[str, ...]) -> Image.Image:
    """`text` set letter by letter along a circular arc (a badge or a bottle's label), photographed."""
    paper, ink = palette(rng)
    face = font(rng, faces, rng.randint(28, 48))
    advance = sum(face.getlength(ch) for ch in text) * 1.08
    sweep = rng.uniform(0.6, 1.6)  # radians the text spans
    radius, up = advance / sweep, rng.choice((1, -1))  # up: letters on top of the circle, else hanging below it
    side = int(2 * radius + 4 * face.size)
    image = pattern(rng, (side, side), paper)
    centre, theta = side / 2, -math.pi / 2 * up - up * sweep / 2
    for ch in text:
        step = face.getlength(ch) * 1.08 / radius
        theta += up * step / 2
        glyph = text_mask(ch, face, 2).rotate(-math.degrees(theta) - 90 * up, Image.Resampling.BICUBIC, expand=True)
        x, y = centre + radius * math.cos(theta), centre + radius * math.sin(theta)
        image.paste(ink, (round(x - glyph.width / 2), round(y - glyph.height / 2)), glyph)
        theta += up * step / 2
    box = (0, 0, side, side // 2 + face.size * 2) if up == 1 else (0, side // 2 - face.size * 2, side, side)
    return camera(fit(image.crop(box)), rng)


def artistic_word(rng: random.Random, text: str, faces: tuple[str, ...]) -> Image.Image:
    """Large letters filled with a two-colour gradient over a hard drop shadow, on a pattern."""
    mask = text_mask(text, font(rng, faces, rng.randint(48, 80)), 10)
    paper, ink = palette(rng)
    top, bottom = np.array(ink, np.float32), np.array(shade(ink, rng.choice((-90, 90))), np.float32)
    t = np.linspace(0, 1, mask.height, dtype=np.float32)[:, None, None]
    fill = Image.fromarray((top + (bottom - top) * t).repeat(mask.width, 1).astype(np.uint8))
    image = pattern(rng, (mask.width + rng.randint(40, 120), mask.height + rng.randint(40, 120)), paper)
    x, y, d = rng.randint(5, image.width - mask.width - 5), rng.randint(5, image.height - mask.height - 5), rng.randint(2, 5)
    image.paste(shade(paper, -120 if sum(paper) > 380 else 120), (x + d, y + d), mask)
    image.paste(fill, (x, y), mask)
    return camera(fit(image), rng, 0.04)


def handwritten(rng: random.Random, text: str, faces: tuple[str, ...]) -> Image.Image:
    """Letters of a handwriting face, each nudged off the baseline, in ballpoint colours on squared paper."""
    face = font(rng, faces, rng.randint(32, 52))
    x, masks = 0, []
    for ch in text:
        masks.append((x, round(rng.gauss(0, face.size * 0.05)), text_mask(ch, face, 2) if ch.strip() else None))
        x += face.getlength(ch) + rng.uniform(-1, 2)
    width, height = int(x) + 60, face.size * 2 + 40
    paper = Image.new("RGB", (width, height), hsv(rng.uniform(0.1, 0.2), rng.uniform(0, 0.08), rng.uniform(0.92, 1)))
    draw, step = ImageDraw.Draw(paper), rng.randint(14, 22)
    for v in range(0, max(width, height), step):
        draw.line((v, 0, v, height), fill=(200, 215, 230))
        draw.line((0, v, width, v), fill=(200, 215, 230))
    ink, baseline = rng.choice(((20, 40, 160), (30, 30, 30), (10, 90, 60))), height // 2 - face.size // 2
    for gx, dy, mask in masks:
        if mask:
            paper.paste(ink, (30 + round(gx), baseline + dy + (face.size - mask.height) // 2 + face.getbbox("x")[1] // 2), mask)
    return camera(fit(paper), rng, 0.03)


def formula(rng: random.Random, nodes: list, faces: tuple[str, ...]) -> Image.Image:
    """A formula set by this module's own layout (baseline-aligned boxes; exponents raised and shrunk, fractions
    stacked, radicals as a drawn hook and bar) in a handwriting face, on squared paper."""
    size = rng.randint(34, 48)
    face_path = rng.choice(faces)
    mask, _ = layout(nodes, face_path, size)
    paper = Image.new("RGB", (mask.width + 60, mask.height + 50), (250, 250, 244))
    draw = ImageDraw.Draw(paper)
    for v in range(0, max(paper.size), 18):
        draw.line((v, 0, v, paper.height), fill=(205, 220, 235))
        draw.line((0, v, paper.width, v), fill=(205, 220, 235))
    paper.paste(rng.choice(((20, 40, 160), (30, 30, 30))), (30, 25), mask)
    return camera(fit(paper), rng, 0.03)


def layout(nodes: list, face_path: str, size: int) -> tuple[Image.Image, int]:
    """(mask, baseline y) of formula nodes (synthetic.math_expression's)."""
    face = ImageFont.truetype(face_path, size)
    boxes = []  # (mask, baseline)
    for node in nodes:
        if isinstance(node, str):
            text = syn.GREEK.get(node, node)
            m = Image.new("L", (int(face.getlength(text)) + 6, int(size * 1.4)))
            ImageDraw.Draw(m).text((3, size), text, font=face, fill=255, anchor="ls")
            boxes.append((m, size))
        elif node[0] == "sup":
            base, b = layout([node[1]], face_path, size)
            exponent, e = layout(node[2], face_path, size * 3 // 5)
            rise = size // 2
            top = max(0, exponent.height - (b - rise) + 0)
            m = Image.new("L", (base.width + exponent.width, base.height + top))
            m.paste(base, (0, top))
            m.paste(exponent, (base.width, top + b - rise - e), exponent)
            boxes.append((m, b + top))
        elif node[0] == "frac":
            num, _ = layout(node[1], face_path, size * 4 // 5)
            den, _ = layout(node[2], face_path, size * 4 // 5)
            width, bar = max(num.width, den.width) + 10, num.height + 3
            m = Image.new("L", (width, num.height + den.height + 8))
            m.paste(num, ((width - num.width) // 2, 0))
            ImageDraw.Draw(m).line((0, bar, width, bar), fill=255, width=max(2, size // 16))
            m.paste(den, ((width - den.width) // 2, bar + 5))
            boxes.append((m, bar + size // 4))
        else:
            body, b = layout(node[1], face_path, size)
            hook = size // 2
            m = Image.new("L", (body.width + hook + 4, body.height + 6))
            ImageDraw.Draw(m).line(
                [(0, m.height * 0.6), (hook * 0.4, m.height - 2), (hook, 3), (m.width - 1, 3)], fill=255, width=max(2, size // 16)
            )
            m.paste(body, (hook + 2, 6), body)
            boxes.append((m, b + 6))
    above = max(b for _, b in boxes)
    below = max(m.height - b for m, b in boxes)
    out, x = Image.new("L", (sum(m.width for m, _ in boxes), above + below)), 0
    for m, b in boxes:
        out.paste(m, (x, above - b), m)
        x += m.width
    return out, above


# ---------------------------------------------------------------- the categories


def regular(rng, fonts: Fonts):
    text = syn.word(rng, ocr_eval.HELD_OUT)
    return label(rng, text, fonts.any), ocr_eval.RECOGNITION_QUESTION, text


def curved(rng, fonts: Fonts):
    text = syn.word(rng, ocr_eval.HELD_OUT)
    return arc(rng, text, fonts.any), ocr_eval.RECOGNITION_QUESTION, text


def rotated(rng, fonts: Fonts):
    text = syn.word(rng, ocr_eval.HELD_OUT)
    return label(rng, text, fonts.any, rng.choice((-1, 1)) * rng.uniform(30, 90)), ocr_eval.RECOGNITION_QUESTION, text


def artistic(rng, fonts: Fonts):
    text = syn.word(rng, ocr_eval.HELD_OUT)
    return artistic_word(rng, text, fonts.any), ocr_eval.RECOGNITION_QUESTION, text


def handwriting(rng, fonts: Fonts):
    text = syn.handwritten_text(rng, ocr_eval.HELD_OUT)
    return handwritten(rng, text, fonts.hand), ocr_eval.RECOGNITION_QUESTION, text


def digit_string(rng, fonts: Fonts):
    text = "".join(rng.choices("0123456789", k=rng.randint(5, 12)))
    return label(rng, text, fonts.any, rng.uniform(-5, 5)), ocr_eval.RECOGNITION_QUESTION, text


def non_semantic(rng, fonts: Fonts):
    text = syn.random_string(rng)
    return label(rng, text, fonts.mono + fonts.any), ocr_eval.RECOGNITION_QUESTION, text


def handwritten_math(rng, fonts: Fonts):
    with syn.using_fonts(fonts.hand):  # Greek letters only where these faces draw them
        nodes = syn.math_expression(rng)
    return formula(rng, nodes, fonts.hand), syn.HME_QUESTION, syn.latex(nodes)


def table_page(rng, fonts: Fonts, title: str, rows: list[tuple[str, str]], header: tuple[str, str] | None) -> Image.Image:
    """A page with a title and a ruled two-column table (header row shaded), photographed on a pattern."""
    paper, ink = palette(rng)
    face, bold = font(rng, fonts.any, rng.randint(18, 24)), font(rng, fonts.any, rng.randint(26, 34))
    row_h, pad = int(face.size * 1.9), 12
    col = max(face.getlength(a) for a, _ in rows + [header or ("", "")]) + 3 * pad
    width = int(col + max(face.getlength(b) for _, b in rows + [header or ("", "")]) + 3 * pad)
    width = max(width, int(bold.getlength(title)) + 2 * pad)
    height = int(bold.size * 2.2) + row_h * (len(rows) + bool(header)) + 2 * pad
    page = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(page)
    draw.text((width // 2, pad), title, font=bold, fill=ink, anchor="ma")
    y = int(bold.size * 2.2)
    for i, (a, b) in enumerate(([header] if header else []) + rows):
        if header and i == 0:
            draw.rectangle((pad, y, width - pad, y + row_h), fill=shade(paper, -30 if sum(paper) > 380 else 30))
        draw.rectangle((pad, y, width - pad, y + row_h), outline=ink)
        draw.line((col, y, col, y + row_h), fill=ink)
        draw.text((2 * pad, y + row_h // 2), a, font=face, fill=ink, anchor="lm")
        draw.text((width - 2 * pad, y + row_h // 2), b, font=face, fill=ink, anchor="rm")
        y += row_h
    surface = pattern(rng, (width + rng.randint(20, 120), height + rng.randint(20, 120)), palette(rng)[0])
    surface.paste(page, (rng.randint(0, surface.width - width), rng.randint(0, surface.height - height)))
    return camera(fit(surface), rng, 0.05)


def key_information(rng, fonts: Fonts):
    """A ticket or invoice as a ruled table: questions on its amounts, date and number."""
    number, when = f"No. {rng.randint(10000, 999999)}", syn.date(rng)
    items = {syn.word(rng, ocr_eval.HELD_OUT).capitalize(): rng.randint(99, 9999) for _ in range(rng.randint(2, 5))}
    total = syn.money(sum(items.values()))
    rows = [("Number", number.removeprefix("No. ")), ("Date", when)] + [(k, syn.money(v)) for k, v in items.items()] + [("Total", total)]
    image = table_page(rng, fonts, rng.choice(("INVOICE", "TICKET", "STATEMENT", "BILL")), rows, ("Item", "Amount"))
    question, answer = rng.choice(
        [
            ("What is the total amount?", total),
            ("What is the date on the document?", when),
            ("What is the document number?", number.removeprefix("No. ")),
        ]
    )
    return image, question, answer


def document_vqa(rng, fonts: Fonts):
    """A letter whose To/From/Date/Subject stand in a boxed table at the top right, a body paragraph below."""
    header = {
        "To": syn.person(rng, ocr_eval.HELD_OUT),
        "From": syn.person(rng, ocr_eval.HELD_OUT),
        "Date": syn.date(rng),
        "Subject": f"{syn.word(rng, ocr_eval.HELD_OUT).capitalize()} {rng.choice(ocr_eval.HELD_OUT_NOUNS)} {rng.choice(('review', 'notice', 'request'))}",
    }
    image = table_page(rng, fonts, rng.choice(("LETTER", "CIRCULAR", "NOTE")), list(header.items()), None)
    key = rng.choice(list(header))
    return image, syn.MEMO_QUESTIONS[key], header[key]


def scene_vqa(rng, fonts: Fonts):
    """A shop front: a wide banner with the name, a small plaque with the year and hours, on a wall, photographed at an angle."""
    name = f"{syn.word(rng, ocr_eval.HELD_OUT).capitalize()} {rng.choice(ocr_eval.SHOP_KINDS)}"
    info = {"name": name, "year": str(rng.randint(1890, 2020)), "hours": f"{rng.randint(6, 10)}:00-{rng.randint(17, 23)}:00"}
    wall = pattern(rng, (MAX_SIDE, rng.randint(360, 480)), palette(rng)[0])
    board, ink = palette(rng)
    banner_text = text_mask(name.upper() if rng.random() < 0.5 else name, font(rng, fonts.any, rng.randint(36, 56)))
    banner = Image.new("RGB", (min(MAX_SIDE - 20, banner_text.width + 40), banner_text.height + 30), board)
    banner.paste(ink, (20, 15), banner_text.crop((0, 0, banner.width - 40, banner_text.height)))
    x = rng.randint(10, MAX_SIDE - banner.width - 10)
    wall.paste(banner, (x, rng.randint(10, 60)))
    small = font(rng, fonts.any, rng.randint(20, 26))
    plaque = Image.new("RGB", (int(small.getlength(f"OPEN {info['hours']}")) + 30, small.size * 3 + 20), shade(board, 40))
    draw = ImageDraw.Draw(plaque)
    draw.text((15, 10), f"SINCE {info['year']}", font=small, fill=ink)
    draw.text((15, 10 + int(small.size * 1.5)), f"OPEN {info['hours']}", font=small, fill=ink)
    wall.paste(plaque, (rng.randint(10, MAX_SIDE - plaque.width - 10), wall.height - plaque.height - rng.randint(10, 80)))
    key = rng.choice(list(info))
    return camera(wall, rng, 0.08), syn.SIGN_QUESTIONS[key], info[key]


def categories(fonts: Fonts) -> dict:
    """ocr_eval.CATEGORIES' names (dataset names prefixed "unseen_"), with this module's makers bound to `fonts`."""
    makers = {
        "Regular Text Recognition": regular,
        "Irregular Text Recognition": curved,
        "Rotated Text Recognition": rotated,
        "Artistic Text Recognition": artistic,
        "Handwriting Recognition": handwriting,
        "Digit String Recognition": digit_string,
        "Non-Semantic Text Recognition": non_semantic,
        "Handwritten Mathematical Expression Recognition": handwritten_math,
        "Key Information Extraction": key_information,
        "Doc-oriented VQA": document_vqa,
        "Scene Text-centric VQA": scene_vqa,
    }
    return {
        category: (name if name == "HME100k" else name.replace("beni_", "unseen_"), partial(makers[category], fonts=fonts))
        for category, (name, _) in ocr_eval.CATEGORIES.items()
    }


def make_unseen_set(
    out_dir: Path,
    fonts_root: Path | None,
    settings: ocr_eval.EvalSetSettings,
    exclude_answers: set[str] = frozenset(),
    camera: bool = True,
) -> Path | None:
    """The unseen-renderer set's JSON in out_dir (see ocr_eval.generate_eval_set), or None when `fonts_root` holds no
    fetched fonts (an unseen set drawn in the corpus's fonts would not be unseen). `camera` False: the same items
    as drawn, before the camera (`without_camera`), which tells unseen glyphs and layouts from photo effects."""
    if not (fonts_root and (Path(fonts_root) / MANIFEST).is_file()):
        return None
    with nullcontext() if camera else without_camera():
        return ocr_eval.generate_eval_set(out_dir, settings, exclude_answers, categories(Fonts.unseen(fonts_root)), "unseen")


def make_sets(
    heldout_dir: Path,
    unseen_dir: Path,
    fonts_root: Path | None,
    settings: ocr_eval.EvalSetSettings,
    exclude_answers: set[str] = frozenset(),
) -> dict[str, Path]:
    """The held-out sets, as `heldout_eval_set` makes them: {"heldout": the same-generator set's JSON, drawn with the
    corpus's fonts, in heldout_dir; when fonts are fetched, "unseen": the unseen-renderer set's, in unseen_dir, and
    "unseen_no_camera": its items before the camera, in unseen_dir's sibling "<name>_no_camera"}.
    `exclude_answers`: the corpus's (ocr_eval.corpus_answers)."""
    sets = {"heldout": ocr_eval.generate_eval_set(heldout_dir, replace(settings, fonts=corpus_fonts(fonts_root)), exclude_answers)}
    if unseen := make_unseen_set(unseen_dir, fonts_root, settings, exclude_answers):
        sets["unseen"] = unseen
        no_camera = unseen_dir.with_name(unseen_dir.name + "_no_camera")
        sets["unseen_no_camera"] = make_unseen_set(no_camera, fonts_root, settings, exclude_answers, camera=False)
    return sets
