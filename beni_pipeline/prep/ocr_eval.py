"""A held-out OCRBench-format eval set drawn with the training corpus's renderers (synthetic.py), never overlapping it.

Eight of OCRBench's ten categories (no handwriting, no handwritten maths): regular, irregular (curved and
rotated) and artistic text recognition, digit strings, non-semantic random strings, key-information extraction on
receipts and forms, document VQA on memos, and scene-text VQA on shop signs over photo-like backgrounds. One
question per image, as in OCRBench.

Held out by construction: seeds live in their own namespace ("heldout:..."; the corpus uses "seed:index"), every
word-like text comes from vocabularies disjoint from the corpus's, and, given the corpus, any candidate whose
answer the corpus also answers is redrawn. `find_overlaps` then checks a finished set against a corpus.jsonl by
image content hash and by answer text.
"""

import hashlib
import json
import os
import random
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from beni_pipeline.prep import synthetic as syn

MAX_ATTEMPTS = 100  # draws of one item before giving up on finding an answer the corpus lacks
RECOGNITION_QUESTION = "what is written in the image?"  # OCRBench's own wording for recognition items

HELD_OUT_ADJECTIVES = """amber velvet crimson lunar marble silver copper scarlet polished rusty dusty hollow
fragile humble noble patient curious eager fierce jolly""".split()
HELD_OUT_NOUNS = """meadow canyon glacier orchard prairie valley tunnel tower compass anchor beacon saddle violin
trumpet puzzle ladder mirror blanket jacket helmet rocket comet falcon otter badger walnut pepper ginger melon
cherry lemon peach garlic carrot thunder breeze harvest festival voyage summit pebble crystal ribbon feather
parcel kettle chimney balcony""".split()
HELD_OUT_VERBS = """inspect polish collect assemble measure wrap gather sort label stack paint renew""".split()
HELD_OUT_FIRST_NAMES = """Agnes Bruno Celia Dmitri Elsa Farid Greta Henrik Ines Jasper Kofi Lucia Mateo Nadia
Oscar Priya Quentin Rhea Soren Thea Ugo Vera Wim Ximena Yara Zeno""".split()
HELD_OUT_LAST_NAMES = """Almeida Brandt Castillo Dimitrov Eriksen Fontaine Gallo Haddad Ito Jansen Kowalski
Lopez Mbeki Nakamura Olsen Petrov Quinn Richter Sato Toivonen""".split()
SHOP_KINDS = """Tavern Florist Barber Cinema Gallery Boutique Pizzeria Laundry Garage Studio""".split()
MEMO_TITLES = ("MEMORANDUM", "INTERNAL MEMO", "NOTICE", "MEETING NOTE")

# The training corpus's word lists: the held-out ones above must share no word with them.
TRAINING_VOCABULARY = (syn.ADJECTIVES + syn.NOUNS + syn.VERBS + syn.FIRST_NAMES + syn.LAST_NAMES + syn.CITIES + syn.STREETS
                       + syn.SHOP_WORDS + syn.SHOP_TYPES + syn.ITEMS)
HELD_OUT_VOCABULARY = HELD_OUT_ADJECTIVES + HELD_OUT_NOUNS + HELD_OUT_VERBS + HELD_OUT_FIRST_NAMES + HELD_OUT_LAST_NAMES + SHOP_KINDS


@dataclass(frozen=True)
class EvalSetSettings:
    per_category: int = 25
    seed: int = 0


@dataclass(frozen=True)
class Overlap:
    id: int
    reason: str  # "image" (same pixels as a corpus image) or "text" (an answer the corpus also answers)
    detail: str


def answer_key(text: str) -> str:
    """Answers compare as OCRBench compares them: lower-cased, stripped, newlines as spaces."""
    return text.lower().strip().replace("\n", " ")


# ---------------------------------------------------------------- recognition


def held_out_word(rng: random.Random) -> str:
    w = rng.choice(rng.choice((HELD_OUT_ADJECTIVES, HELD_OUT_NOUNS, HELD_OUT_VERBS, HELD_OUT_FIRST_NAMES)))
    return rng.choice((str.lower, str.capitalize, str.upper))(w)


def style(rng: random.Random, fonts=None, backgrounds=syn.BACKGROUNDS, rotation: float = 0.0, size=(24, 64), blur: bool = True) -> syn.TextStyle:
    font_size = rng.randint(*size)
    degradation = syn.random_degradation(rng, font_size) if blur else (0.0, 0)
    return syn.TextStyle(rng.choice(fonts or syn.font_paths()), font_size, rng.choice(backgrounds), rotation, *degradation)


def curve(image: Image.Image, rng: random.Random) -> Image.Image:
    """Bend the image along a sine wave (each column shifted up or down), like text on a curved surface. The canvas
    grows by the amplitude at top and bottom (edge rows repeated), so no glyph is pushed out of it."""
    amplitude = max(1, round(rng.uniform(0.06, 0.14) * image.height))
    pixels = np.pad(np.asarray(image), ((amplitude, amplitude), (0, 0), (0, 0)), mode="edge")
    h, w = pixels.shape[:2]
    period, phase = rng.uniform(0.8, 2.0) * w, rng.uniform(0, 2 * np.pi)
    shift = np.round(amplitude * np.sin(2 * np.pi * np.arange(w) / period + phase)).astype(int)
    rows = np.clip(np.arange(h)[:, None] - shift[None, :], 0, h - 1)
    return Image.fromarray(pixels[rows, np.arange(w)[None, :]])


def regular(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = held_out_word(rng)
    return syn.render_text(rng, text, style(rng, backgrounds=("plain", "textured"), blur=False)), RECOGNITION_QUESTION, text


def digit_string(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = "".join(rng.choices("0123456789", k=rng.randint(5, 12)))
    return syn.render_text(rng, text, style(rng, backgrounds=("plain", "textured"))), RECOGNITION_QUESTION, text


def non_semantic(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = syn.random_string(rng)
    return syn.render_text(rng, text, style(rng)), RECOGNITION_QUESTION, text


def irregular(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = held_out_word(rng)
    angle = rng.choice((-1, 1)) * rng.uniform(10, 35)
    image = syn.render_text(rng, text, style(rng, rotation=angle, size=(32, 64)))
    return curve(image, rng), RECOGNITION_QUESTION, text


def artistic(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = held_out_word(rng)
    fancy = [p for p in syn.font_paths() if p and any(k in Path(p).stem.lower() for k in ("bold", "italic", "oblique"))]
    return syn.render_text(rng, text, style(rng, fancy, ("photo",), rng.uniform(-8, 8), (40, 72))), RECOGNITION_QUESTION, text


# ---------------------------------------------------------------- documents and scenes


def key_information(rng: random.Random) -> tuple[Image.Image, str, str]:
    """A receipt or a form from the corpus's renderers; questions only on the fields whose values are drawn per
    document (amounts, dates, numbers), never on names from the corpus's word lists."""
    if rng.random() < 0.5:
        image, info = syn.render_receipt(rng)
        item = rng.choice(list(info["items"]))
        question, answer = rng.choice([
            ("What is the total amount on this receipt?", info["total"]),
            ("What is the subtotal?", info["subtotal"]),
            ("What is the date on the receipt?", info["date"]),
            (f"What is the price of {item}?", info["items"][item]),
        ])
        return image, question, answer
    image, _, fields = syn.render_form(rng)
    asked = [label for label in fields if label not in ("Name", "Email", "City")]
    if not asked:
        return key_information(rng)
    label = rng.choice(asked)
    return image, f"What is the {syn.FORM_FIELDS[label][0]} on the form?", fields[label]


def person(rng: random.Random) -> str:
    return f"{rng.choice(HELD_OUT_FIRST_NAMES)} {rng.choice(HELD_OUT_LAST_NAMES)}"


def memo_sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(HELD_OUT_ADJECTIVES)} {rng.choice(HELD_OUT_NOUNS)} team will {rng.choice(HELD_OUT_VERBS)} "
            f"every {rng.choice(HELD_OUT_NOUNS)} before the {rng.choice(HELD_OUT_NOUNS)} {rng.choice(('review', 'deadline', 'launch', 'audit'))}.")


def document_vqa(rng: random.Random) -> tuple[Image.Image, str, str]:
    """A memo: title, To/From/Date/Subject header and a short body, scanned or photographed."""
    header = {"To": person(rng), "From": person(rng), "Date": syn.date(rng),
              "Subject": f"{rng.choice(HELD_OUT_ADJECTIVES).capitalize()} {rng.choice(HELD_OUT_NOUNS)} {rng.choice(('plan', 'schedule', 'update', 'budget'))}"}
    body = [memo_sentence(rng) for _ in range(rng.randint(2, 3))]
    size = rng.randint(syn.MIN_FONT_SIZE, 22)
    font, title_font = syn.load_font(rng.choice(syn.font_paths()), size), syn.load_font(rng.choice(syn.font_paths()), size + rng.randint(6, 12))
    wrap = rng.randint(34, 48)
    lines = [f"{k}: {v}" for k, v in header.items()] + [""] + [line for s in body for line in textwrap.wrap(s, wrap)]
    margin, line_h = rng.randint(16, 32), int(size * 1.5)
    width = int(max(font.getlength(line) for line in lines) + 2 * margin)
    height = 2 * margin + 2 * title_font.size + line_h * len(lines)
    page = Image.new("RGB", (min(width, syn.MAX_SIDE), min(height, syn.MAX_SIDE)), syn.light_colour(rng))
    draw, ink = ImageDraw.Draw(page), syn.ink_colour(rng, True)
    draw.text((margin, margin), rng.choice(MEMO_TITLES), font=title_font, fill=ink)
    y = margin + 2 * title_font.size
    for line in lines:
        draw.text((margin, y), line, font=font, fill=ink)
        y += line_h
    image = syn.degrade(syn.place_on_background(rng, page), rng, *syn.random_degradation(rng, size))
    key = rng.choice(list(header))
    question = {"To": "Who is the memo addressed to?", "From": "Who wrote the memo?", "Date": "What is the date of the memo?",
                "Subject": "What is the subject of the memo?"}[key]
    return image, question, header[key]


def scene_text_vqa(rng: random.Random) -> tuple[Image.Image, str, str]:
    """A shop sign (name, founding year, opening hours) on a photo-like scene."""
    name = f"{rng.choice(HELD_OUT_ADJECTIVES + HELD_OUT_NOUNS).capitalize()} {rng.choice(SHOP_KINDS)}"
    year, hours = str(rng.randint(1890, 2020)), f"{rng.randint(6, 10)}:00-{rng.randint(17, 23)}:00"
    lines = [name.upper() if rng.random() < 0.5 else name, f"EST. {year}", f"OPEN {hours}"]
    size = rng.randint(24, 44)
    font, small = syn.load_font(rng.choice(syn.font_paths()), size), syn.load_font(rng.choice(syn.font_paths()), max(syn.MIN_FONT_SIZE, size * 2 // 3))
    pad = size // 2
    sign_w = int(max(font.getlength(lines[0]), small.getlength(lines[2])) + 2 * pad)
    sign_h = int(size * 1.4 + 2 * small.size * 1.4 + 2 * pad)
    board = syn.paper_colour(rng)
    ink = syn.ink_colour(rng, sum(board) / 3 > 128)
    sign = Image.new("RGB", (sign_w, sign_h), board)
    draw = ImageDraw.Draw(sign)
    draw.rectangle((2, 2, sign_w - 3, sign_h - 3), outline=ink, width=2)
    draw.text((sign_w / 2, pad), lines[0], font=font, fill=ink, anchor="ma")
    draw.text((sign_w / 2, pad + size * 1.4), lines[1], font=small, fill=ink, anchor="ma")
    draw.text((sign_w / 2, pad + size * 1.4 + small.size * 1.4), lines[2], font=small, fill=ink, anchor="ma")
    sign = sign.convert("RGBA").rotate(rng.uniform(-6, 6), Image.Resampling.BILINEAR, expand=True)
    width = min(syn.MAX_SIDE, sign.width + rng.randint(60, 300))
    height = min(syn.MAX_SIDE, sign.height + rng.randint(60, 300))
    scene = syn.background(rng, (width, height), "photo")
    scene.paste(sign, (rng.randint(0, max(0, width - sign.width)), rng.randint(0, max(0, height - sign.height))), sign)
    question, answer = rng.choice([("What is the name of the shop on the sign?", name), ("In which year was the shop established?", year),
                                   ("What are the opening hours on the sign?", hours)])
    return syn.degrade(scene, rng, *syn.random_degradation(rng, size)), question, answer


# OCRBench's category names (its `type` field), our dataset name for each, and the item maker.
CATEGORIES = {
    "Regular Text Recognition": ("beni_regular", regular),
    "Irregular Text Recognition": ("beni_curved", irregular),
    "Artistic Text Recognition": ("beni_artistic", artistic),
    "Digit String Recognition": ("beni_digits", digit_string),
    "Non-Semantic Text Recognition": ("beni_random", non_semantic),
    "Key Information Extraction": ("beni_kie", key_information),
    "Doc-oriented VQA": ("beni_memo", document_vqa),
    "Scene Text-centric VQA": ("beni_signs", scene_text_vqa),
}


# ---------------------------------------------------------------- the set on disk, and the overlap check


def corpus_answers(corpus_jsonl: str | Path) -> set[str]:
    """Every assistant answer in a corpus.jsonl (LLaVA-style `conversations`), as OCRBench compares answers."""
    answers = set()
    for line in Path(corpus_jsonl).read_text().splitlines():
        for turn in json.loads(line).get("conversations") or []:
            if turn["from"] in ("gpt", "assistant"):
                answers.add(answer_key(turn["value"]))
    return answers


def image_hash(path: str | Path) -> str:
    """Content hash of the decoded pixels (and size): the same image, whatever its file's metadata."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


def generate_eval_set(out_dir: str | Path, settings: EvalSetSettings = EvalSetSettings(), exclude_answers: set[str] = frozenset()) -> Path:
    """Writes out_dir/images/*.jpg and out_dir/ocr_eval.json (OCRBench format, image paths relative to out_dir);
    returns the JSON path. `exclude_answers` (see `corpus_answers`) are never used as answers: such a candidate is
    redrawn from the next seed."""
    if settings.per_category < 1:
        raise ValueError(f"per_category must be at least 1, not {settings.per_category}.")
    out_dir = Path(out_dir)
    images = out_dir / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    items = []
    for category, (dataset_name, make) in CATEGORIES.items():
        for index in range(settings.per_category):
            for attempt in range(MAX_ATTEMPTS):
                rng = random.Random(f"heldout:{settings.seed}:{dataset_name}:{index}:{attempt}")
                image, question, answer = make(rng)
                if answer_key(answer) not in exclude_answers:
                    break
            else:
                raise ValueError(f"{MAX_ATTEMPTS} draws of {category} item {index} all gave answers the corpus has: the corpus covers this category's answers.")
            name = f"images/{dataset_name}_{index:05d}.jpg"
            (out_dir / name).write_bytes(syn.jpeg(image))
            items.append({"dataset_name": dataset_name, "id": len(items), "image_path": name, "question": question, "answers": [answer], "type": category})
    path = out_dir / "ocr_eval.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def find_overlaps(eval_json: str | Path, eval_image_root: str | Path, corpus_jsonl: str | Path) -> list[Overlap]:
    """Eval items that share an image (by content hash) or an answer text with the corpus. Corpus rows name their
    images by `url`, relative to the corpus.jsonl's folder (remote urls cannot be hashed and are skipped)."""
    corpus_jsonl = Path(corpus_jsonl)
    corpus_images = set()
    for line in corpus_jsonl.read_text().splitlines():
        url = json.loads(line)["url"]
        path = corpus_jsonl.parent / url.removeprefix("file://")
        if "://" not in url.removeprefix("file://") and path.is_file():
            corpus_images.add(image_hash(path))
    answers = corpus_answers(corpus_jsonl)
    overlaps = []
    for item in json.loads(Path(eval_json).read_text()):
        if image_hash(Path(eval_image_root) / item["image_path"]) in corpus_images:
            overlaps.append(Overlap(item["id"], "image", item["image_path"]))
        item_answers = [item["answers"]] if isinstance(item["answers"], str) else item["answers"]
        overlaps += [Overlap(item["id"], "text", a) for a in item_answers if answer_key(a) in answers]
    return overlaps
