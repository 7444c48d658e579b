"""A held-out OCRBench-format eval set drawn with the training corpus's renderers (synthetic.py), never overlapping it.

OCRBench's ten categories: regular, irregular (curved and rotated), artistic and handwritten text recognition, digit
strings, non-semantic random strings, handwritten mathematical expressions (answered in LaTeX), key-information
extraction on receipts and forms, document VQA on memos, and scene-text VQA on shop signs over photo-like
backgrounds. One question per image, as in OCRBench.

Held out by construction: the renderers are the corpus's own, but seeds live in their own namespace ("heldout:...";
the corpus uses "seed:index"), every word-like text comes from a vocabulary disjoint from the corpus's, and, given the
corpus, any candidate whose answer the corpus also answers is redrawn. `find_overlaps` then checks a finished set
against a corpus.jsonl by image content hash and by answer text.
"""

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from beni_pipeline.prep import synthetic as syn
from beni_pipeline.prep.files import write_text_atomic
from beni_pipeline.prep.processes import process_pool

MAX_ATTEMPTS = 100  # draws of one item before giving up on finding an answer the corpus lacks
RECOGNITION_QUESTION = "what is written in the image?"  # OCRBench's own wording for recognition items

HELD_OUT_ADJECTIVES = """amber velvet crimson lunar marble silver copper scarlet polished rusty dusty hollow
fragile humble noble patient curious eager fierce jolly""".split()
HELD_OUT_NOUNS = """meadow canyon glacier orchard prairie valley tunnel tower compass anchor beacon saddle violin
trumpet puzzle ladder mirror blanket jacket helmet rocket comet falcon otter badger walnut pepper ginger melon
cherry lemon peach garlic carrot thunder breeze harvest festival voyage summit pebble crystal ribbon feather
parcel kettle chimney balcony""".split()
HELD_OUT_VERBS = """inspected polished collected assembled measured wrapped gathered sorted labelled stacked renewed""".split()
HELD_OUT_FIRST_NAMES = """Agnes Bruno Celia Dmitri Elsa Farid Greta Henrik Ines Jasper Kofi Lucia Mateo Nadia
Oscar Priya Quentin Rhea Soren Thea Ugo Vera Wim Ximena Yara Zeno""".split()
HELD_OUT_LAST_NAMES = """Almeida Brandt Castillo Dimitrov Eriksen Fontaine Gallo Haddad Ito Jansen Kowalski
Lopez Mbeki Nakamura Olsen Petrov Quinn Richter Sato Toivonen""".split()
SHOP_KINDS = """Tavern Florist Barber Cinema Gallery Boutique Pizzeria Laundry Garage Studio""".split()
HELD_OUT = syn.Vocabulary(HELD_OUT_ADJECTIVES, HELD_OUT_NOUNS, HELD_OUT_VERBS, HELD_OUT_FIRST_NAMES, HELD_OUT_LAST_NAMES, SHOP_KINDS)

# The training corpus's word lists: the held-out ones above must share no word with them.
TRAINING_VOCABULARY = (
    syn.ADJECTIVES
    + syn.NOUNS
    + syn.VERBS
    + syn.FIRST_NAMES
    + syn.LAST_NAMES
    + syn.CITIES
    + syn.STREETS
    + syn.SHOP_WORDS
    + syn.SHOP_TYPES
    + syn.ITEMS
)
HELD_OUT_VOCABULARY = HELD_OUT_ADJECTIVES + HELD_OUT_NOUNS + HELD_OUT_VERBS + HELD_OUT_FIRST_NAMES + HELD_OUT_LAST_NAMES + SHOP_KINDS


@dataclass(frozen=True)
class EvalSetSettings:
    per_category: int = 25
    seed: int = 0
    fonts: tuple[str, ...] = ()  # what synthetic's renderers draw with (the corpus's fonts); empty: the machine's own


@dataclass(frozen=True)
class Overlap:
    id: int
    reason: str  # "image" (same pixels as a corpus image) or "text" (an answer the corpus also answers)
    detail: str


def answer_key(text: str) -> str:
    """Answers compare as OCRBench compares them: lower-cased, stripped, newlines as spaces."""
    return text.lower().strip().replace("\n", " ")


# ---------------------------------------------------------------- recognition


def regular(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = syn.word(rng, HELD_OUT)
    return syn.render_text(rng, text, syn.text_style(rng, backgrounds=("plain", "textured"), blur=False)), RECOGNITION_QUESTION, text


def digit_string(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = "".join(rng.choices("0123456789", k=rng.randint(5, 12)))
    return syn.render_text(rng, text, syn.text_style(rng, backgrounds=("plain", "textured"))), RECOGNITION_QUESTION, text


def non_semantic(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = syn.random_string(rng)
    return syn.render_text(rng, text, syn.text_style(rng)), RECOGNITION_QUESTION, text


def irregular(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = syn.word(rng, HELD_OUT)
    return syn.render_irregular(rng, text), RECOGNITION_QUESTION, text


def rotated(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = syn.word(rng, HELD_OUT)
    angle = rng.choice((-1, 1)) * rng.uniform(30, 90)
    return syn.render_text(rng, text, syn.text_style(rng, rotation=angle, size=(28, 64))), RECOGNITION_QUESTION, text


def artistic(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = syn.word(rng, HELD_OUT)
    return syn.render_artistic(rng, text), RECOGNITION_QUESTION, text


def handwriting(rng: random.Random) -> tuple[Image.Image, str, str]:
    text = syn.handwritten_text(rng, HELD_OUT)
    return syn.render_handwriting(rng, text), RECOGNITION_QUESTION, text


def handwritten_math(rng: random.Random) -> tuple[Image.Image, str, str]:
    nodes = syn.math_expression(rng)
    return syn.render_math(rng, nodes), syn.HME_QUESTION, syn.latex(nodes)


# ---------------------------------------------------------------- documents and scenes


def key_information(rng: random.Random) -> tuple[Image.Image, str, str]:
    """A receipt or a form from the corpus's renderers; questions only on the fields whose values are drawn per
    document (amounts, dates, numbers), never on names from the corpus's word lists."""
    if rng.random() < 0.5:
        image, info, _ = syn.render_receipt(rng)
        item = rng.choice(list(info["items"]))
        question, answer = rng.choice(
            [
                ("What is the total amount on this receipt?", info["total"]),
                ("What is the subtotal?", info["subtotal"]),
                ("What is the date on the receipt?", info["date"]),
                (f"What is the price of {item}?", info["items"][item]),
            ]
        )
        return image, question, answer
    image, _, fields, _ = syn.render_form(rng)
    asked = [label for label in fields if label not in ("Name", "Email", "City")]
    if not asked:
        return key_information(rng)
    label = rng.choice(asked)
    return image, f"What is the {syn.FORM_FIELDS[label][0]} on the form?", fields[label]


def document_vqa(rng: random.Random) -> tuple[Image.Image, str, str]:
    image, header, _ = syn.render_memo(rng, HELD_OUT)
    key = rng.choice(list(header))
    return image, syn.MEMO_QUESTIONS[key], header[key]


def scene_text_vqa(rng: random.Random) -> tuple[Image.Image, str, str]:
    image, info, _ = syn.render_sign(rng, HELD_OUT)
    key = rng.choice(list(info))
    return image, syn.SIGN_QUESTIONS[key], info[key]


# OCRBench's category names (its `type` field), our dataset name for each, and the item maker. The handwritten maths
# items carry OCRBench's dataset name HME100k: the scoring rule (beni_model.evaluate.normalize) keys on it to keep
# case and ignore spaces, as OCRBench does for LaTeX answers.
CATEGORIES = {
    "Regular Text Recognition": ("beni_regular", regular),
    "Irregular Text Recognition": ("beni_curved", irregular),
    "Rotated Text Recognition": ("beni_rotated", rotated),  # not OCRBench's: reported apart, classic OCR's weak spot
    "Artistic Text Recognition": ("beni_artistic", artistic),
    "Handwriting Recognition": ("beni_handwriting", handwriting),
    "Digit String Recognition": ("beni_digits", digit_string),
    "Non-Semantic Text Recognition": ("beni_random", non_semantic),
    "Handwritten Mathematical Expression Recognition": ("HME100k", handwritten_math),
    "Key Information Extraction": ("beni_kie", key_information),
    "Doc-oriented VQA": ("beni_memo", document_vqa),
    "Scene Text-centric VQA": ("beni_signs", scene_text_vqa),
}


# The corpus kinds (synthetic.KINDS) whose samples teach each category's task: a model trained on a corpus that drew
# none of them has never been asked that category's question.
CATEGORY_KINDS = {
    "Regular Text Recognition": ("word", "sentence", "scene"),
    "Irregular Text Recognition": ("curved",),
    "Rotated Text Recognition": ("rotated",),
    "Artistic Text Recognition": ("artistic",),
    "Handwriting Recognition": ("handwriting",),
    "Digit String Recognition": ("digits",),
    "Non-Semantic Text Recognition": ("random",),
    "Handwritten Mathematical Expression Recognition": ("math",),
    "Key Information Extraction": ("receipt", "form", "labelled"),
    "Doc-oriented VQA": ("memo", "labelled"),
    "Scene Text-centric VQA": ("sign",),
}


def trained_categories(corpus_jsonl: str | Path) -> set[str]:
    """The categories whose kinds the generated corpus at `corpus_jsonl` holds at least one sample of."""
    with open(corpus_jsonl) as f:
        kinds = {json.loads(line).get("kind") for line in f}
    return {category for category, taught_by in CATEGORY_KINDS.items() if kinds & set(taught_by)}


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


def generate_eval_set(
    out_dir: str | Path,
    settings: EvalSetSettings = EvalSetSettings(),
    exclude_answers: set[str] = frozenset(),
    categories: dict = CATEGORIES,
    namespace: str = "heldout",
) -> Path:
    """Writes out_dir/images/*.jpg and out_dir/ocr_eval.json (OCRBench format, image paths relative to out_dir);
    returns the JSON path. `exclude_answers` (see `corpus_answers`) are never used as answers: such a candidate is
    redrawn from the next seed. `categories` and `namespace` (of the item seeds): another set's, e.g. the
    unseen-renderer set's (unseen_eval.py)."""
    if settings.per_category < 1:
        raise ValueError(f"per_category must be at least 1, not {settings.per_category}.")
    out_dir = Path(out_dir)
    images = out_dir / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    items = []
    with syn.using_fonts(settings.fonts):
        for category, (dataset_name, make) in categories.items():
            items += category_items(out_dir, settings, exclude_answers, category, dataset_name, make, namespace, len(items))
    path = out_dir / "ocr_eval.json"
    write_text_atomic(path, json.dumps(items, indent=1, ensure_ascii=False) + "\n")
    return path


def category_items(
    out_dir: Path,
    settings: EvalSetSettings,
    exclude_answers: set[str],
    category: str,
    dataset_name: str,
    make,
    namespace: str,
    first_id: int,
) -> list[dict]:
    """One category's items, their images written under out_dir/images, numbered from `first_id`."""
    items = []
    for index in range(settings.per_category):
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(f"{namespace}:{settings.seed}:{dataset_name}:{index}:{attempt}")
            image, question, answer = make(rng)
            if answer_key(answer) not in exclude_answers:
                break
        else:
            raise ValueError(
                f"{MAX_ATTEMPTS} draws of {category} item {index} all gave answers the corpus has: the corpus covers this category's answers."
            )
        name = f"images/{dataset_name}_{index:05d}.jpg"
        (out_dir / name).write_bytes(syn.jpeg(image))
        item = {"dataset_name": dataset_name, "id": first_id + index, "image_path": name, "question": question, "answers": [answer]}
        items.append({**item, "type": category})
    return items


def find_overlaps(eval_json: str | Path, eval_image_root: str | Path, corpus_jsonl: str | Path) -> list[Overlap]:
    """Eval items that share an image (by content hash) or an answer text with the corpus. Corpus rows name their
    images by `url`, relative to the corpus.jsonl's folder (remote urls cannot be hashed and are skipped)."""
    corpus_jsonl = Path(corpus_jsonl)
    paths = []
    for line in corpus_jsonl.read_text().splitlines():
        url = json.loads(line)["url"]
        path = corpus_jsonl.parent / url.removeprefix("file://")
        if "://" not in url.removeprefix("file://") and path.is_file():
            paths.append(path)
    # Decoding is ~1.6 ms an image: minutes for a GPU run's corpus on one core.
    with process_pool(max(1, min(os.cpu_count() or 1, len(paths) // 1000))) as pool:
        corpus_images = set(pool.map(image_hash, paths, chunksize=256))
    answers = corpus_answers(corpus_jsonl)
    overlaps = []
    for item in json.loads(Path(eval_json).read_text()):
        if image_hash(Path(eval_image_root) / item["image_path"]) in corpus_images:
            overlaps.append(Overlap(item["id"], "image", item["image_path"]))
        item_answers = [item["answers"]] if isinstance(item["answers"], str) else item["answers"]
        overlaps += [Overlap(item["id"], "text", a) for a in item_answers if answer_key(a) in answers]
    return overlaps
