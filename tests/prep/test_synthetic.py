import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from beni_model.evaluate import is_correct
from beni_pipeline.prep import synthetic, tesseract, widened
from beni_pipeline.prep.ocr_eval import HELD_OUT
from beni_pipeline.prep.synthetic import CorpusSettings, generate_corpus

SETTINGS = CorpusSettings(samples=60, seed=7, duplicate_fraction=0.1)
KINDS = {
    "word",
    "digits",
    "random",
    "sentence",
    "handwriting",
    "curved",
    "artistic",
    "math",
    "receipt",
    "form",
    "memo",
    "sign",
    "rotated",
    "scene",
}
DOCUMENT_KINDS = {"receipt", "form", "memo", "sign", "labelled"}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("corpus"), SETTINGS)


def test_same_seed_gives_identical_files_whatever_the_process_count(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    again = generate_corpus(tmp_path / "again", SETTINGS)
    assert files(again.parent) == files(corpus.parent)
    other = generate_corpus(tmp_path / "other", CorpusSettings(samples=12, seed=8, duplicate_fraction=0.1))
    assert read_jsonl(other)[:12] != read_jsonl(corpus)[:12]


def test_rows_images_and_planted_duplicates(corpus):
    folder = corpus.parent
    rows = read_jsonl(corpus)
    assert [r["url"] for r in rows] == [f"images/{i:06d}.jpg" for i in range(SETTINGS.samples)]
    assert sorted(p.name for p in (folder / "images").iterdir()) == [r["url"].removeprefix("images/") for r in rows]
    assert {r["kind"] for r in rows} == KINDS
    for row in rows:  # images of one line of text name it, for the reading head; the answer reads it
        if row["kind"] in {"word", "digits", "random", "handwriting", "curved", "artistic", "scene", "arched"}:
            assert row["transcript"] == row["conversations"][1]["value"]
        elif row["kind"] == "rotated":  # read along its columns only while it is turned a little
            assert row.get("transcript", row["conversations"][1]["value"]) == row["conversations"][1]["value"]
        else:
            assert "transcript" not in row
        assert ("lines" in row) == (row["kind"] in DOCUMENT_KINDS)  # documents name their lines, for the line head
    for row in rows:
        with Image.open(folder / row["url"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 90 <= min(image.size) and max(image.size) <= 800
    by_url = {r["url"]: r for r in rows}
    planted = read_jsonl(folder / "planted_duplicates.jsonl")
    assert len(planted) == round(SETTINGS.samples * SETTINGS.duplicate_fraction)
    copies = {p["url"] for p in planted}
    assert {p["change"] for p in planted} == {"resize", "reencode"}
    assert {p["caption_edit"] for p in planted} == {True, False}
    for p in planted:
        copy, original = by_url[p["url"]], by_url[p["duplicate_of"]]
        assert p["duplicate_of"] < p["url"] and p["duplicate_of"] not in copies
        assert copy["kind"] == original["kind"] and copy["conversations"] == original["conversations"]
        assert copy.get("transcript") == original.get("transcript") and copy.get("lines") == original.get("lines")
        assert (copy["caption"] != original["caption"]) == p["caption_edit"]
        # an edit is light and never touches the quoted text
        assert re.findall(r'"[^"]*"', copy["caption"]) == re.findall(r'"[^"]*"', original["caption"])
        assert abs(len(copy["caption"]) - len(original["caption"])) <= 3
        with Image.open(folder / p["url"]) as a, Image.open(folder / p["duplicate_of"]) as b:
            assert (a.size != b.size) == (p["change"] == "resize")


def test_duplicates_look_alike_and_distinct_samples_do_not(corpus):
    folder = corpus.parent
    planted = read_jsonl(folder / "planted_duplicates.jsonl")
    for p in planted:
        assert np.abs(pixels(folder / p["url"]) - pixels(folder / p["duplicate_of"])).mean() < 4
    copies = {p["url"] for p in planted}
    originals = [r["url"] for r in read_jsonl(corpus) if r["url"] not in copies]
    for a, b in zip(originals, originals[1:]):
        assert np.abs(pixels(folder / a) - pixels(folder / b)).mean() > 5


def test_conversations_are_llava_turns_with_one_image_token(corpus):
    for row in read_jsonl(corpus):
        turns = row["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert row["caption"].strip()
        if row["kind"] not in DOCUMENT_KINDS:
            assert f'"{turns[1]["value"]}"' in row["caption"]


def test_second_call_returns_at_once_without_rewriting(corpus):
    before = {p: p.stat().st_mtime_ns for p in corpus.parent.rglob("*")}
    start = time.perf_counter()
    assert generate_corpus(corpus.parent, SETTINGS) == corpus
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in corpus.parent.rglob("*")} == before


def test_a_killed_run_is_regenerated_not_used(corpus, tmp_path):
    folder = tmp_path / "killed"
    code = f"from pathlib import Path; from beni_pipeline.prep.synthetic import *; generate_corpus(Path({str(folder)!r}), {SETTINGS!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        while not (folder / "images").is_dir() or not any((folder / "images").iterdir()):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (folder / "corpus_settings.json").exists()
    generate_corpus(folder, SETTINGS)
    assert files(folder) == files(corpus.parent)


def test_a_damaged_or_other_corpus_is_regenerated(corpus, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(corpus.parent, folder)
    (folder / "corpus_settings.json").unlink()
    (folder / "corpus.jsonl").write_text('{"url": "images/000000.jpg"')
    (folder / "images" / "000005.jpg").unlink()
    generate_corpus(folder, SETTINGS)
    assert files(folder) == files(corpus.parent)
    smaller = CorpusSettings(samples=10, seed=7, duplicate_fraction=0.1)
    generate_corpus(folder, smaller)
    assert len(read_jsonl(folder / "corpus.jsonl")) == len(list((folder / "images").iterdir())) == 10
    assert json.loads((folder / "corpus_settings.json").read_text())["samples"] == 10


def test_renders_without_any_font_files(monkeypatch):
    monkeypatch.setattr(synthetic, "font_paths", lambda: (None,))
    for index in range(12):
        sample = synthetic.make_sample(0, index)
        assert np.asarray(sample.image.convert("L")).std() > 1
    for kind in ("handwriting", "curved", "artistic", "math"):
        sample = synthetic.drawn_sample(random.Random(kind), kind)
        assert np.asarray(sample.image.convert("L")).std() > 1
    answers = [synthetic.latex(synthetic.math_expression(random.Random(i))) for i in range(30)]
    assert not any(letter in answer for answer in answers for letter in synthetic.GREEK)  # the built-in font has no Greek
    image, info, _ = synthetic.render_receipt(random.Random(0))
    assert image.width >= 160 and info["total"]


@pytest.mark.parametrize(
    "settings",
    [
        CorpusSettings(samples=0),
        CorpusSettings(duplicate_fraction=1.0),
        CorpusSettings(duplicate_fraction=-0.1),
        CorpusSettings(photos=1.5),
    ],
)
def test_bad_settings_say_so(settings, tmp_path):
    with pytest.raises(ValueError, match="samples >= 1, 0 <= duplicate_fraction < 1 and 0 <= photos <= 1"):
        generate_corpus(tmp_path, settings)


def ink_box(image: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box of the pen's ink: darker than paper and the ruled lines (which stay above 150 grey)."""
    return Image.fromarray((np.asarray(image.convert("L")) < 150).astype(np.uint8) * 255).getbbox()


def test_handwriting_writes_its_text_and_each_hand_differs():
    short, long = synthetic.render_handwriting(random.Random(5), "ab"), synthetic.render_handwriting(random.Random(5), "abcdefghijkl")
    (left, _, right, _), (long_left, _, long_right, _) = ink_box(short), ink_box(long)
    assert long_right - long_left > 3 * (right - left)  # one mark per letter, not a fixed stamp
    again, other = synthetic.render_handwriting(random.Random(5), "ab"), synthetic.render_handwriting(random.Random(6), "ab")
    assert again.tobytes() == short.tobytes() and other.tobytes() != short.tobytes()
    sample = synthetic.drawn_sample(random.Random(1), "handwriting")
    assert sample.qa[0][1].strip() and f'"{sample.qa[0][1]}"' in sample.caption
    assert sample.qa[0][0] in synthetic.KIND_QUESTIONS["handwriting"]


def test_pen_hands_write_in_strokes_each_letter_its_own():
    assert not any(synthetic.random_hand(random.Random(i), 40).pen_face for i in range(50))
    pens = [synthetic.random_hand(random.Random(i), 40, pen=True) for i in range(200)]
    assert {hand.pen_face for hand in pens} == set(synthetic.PEN_FACES) and min(hand.pen for hand in pens) >= 2
    hand = synthetic.Hand(None, 3, "futural")
    # Two of one letter are drawn apart and unalike; the same seed draws the same line.
    line = np.asarray(synthetic.ink_line(random.Random(0), "o o", hand, 40)) > 128
    columns = np.flatnonzero(line.any(0))
    gap = np.flatnonzero(np.diff(columns) > 1)[0]
    first, second = line[:, : columns[gap] + 1], line[:, columns[gap + 1] :]
    first, second = (m[np.ix_(m.any(1), m.any(0))] for m in (first, second))
    assert first.shape != second.shape or (first != second).any()
    assert (
        synthetic.ink_line(random.Random(0), "o o", hand, 40).tobytes() == synthetic.ink_line(random.Random(0), "o o", hand, 40).tobytes()
    )
    # What the face lacks comes from the hand's font: nothing of the text is left out.
    for text in ("é", "aé"):
        assert (np.asarray(synthetic.ink_line(random.Random(0), text, hand, 40)) > 128).sum() > 100


@pytest.mark.skipif(not tesseract.installed(), reason="tesseract-ocr is not installed")
def test_tesseract_reads_what_the_print_pen_hands_write(tmp_path):
    """The letters stand in order, spaced and whole: a classic OCR engine reads the print faces' writing."""
    words, read = ["harbor", "window", "quiet", "Marble 42"], 0
    faces = [face for face in synthetic.PEN_FACES if not face.startswith(("script", "cursive"))]
    for face in faces:
        for i, word in enumerate(words):
            mask = synthetic.ink_line(random.Random(f"{face}{i}"), word, synthetic.Hand(None, 3, face), 40)
            path = tmp_path / f"{face}{i}.png"
            ImageOps.expand(ImageOps.invert(mask.crop(mask.getbbox())), 20, fill=255).save(path)
            read += tesseract.read((str(path), 7)).lower() == word.lower()
    assert read >= 0.8 * len(faces) * len(words), read


def test_word_art_decorates_the_letters_each_its_own_way():
    style = synthetic.TextStyle(None, 56, "plain", 0.0, 0, 0)
    plain = np.asarray(synthetic.render_text(random.Random(0), "Harbor", style).convert("L"), dtype=float)
    looks = {}
    for effect in synthetic.WORD_ART:
        image = synthetic.render_text(random.Random(0), "Harbor", replace(style, effect=effect))
        assert image.size == synthetic.render_text(random.Random(0), "Harbor", replace(style, effect=effect)).size
        looks[effect] = np.asarray(image.convert("L"), dtype=float)
    # On a plain background the outline is the plain ink (outlines are for photos); every other effect draws otherwise.
    assert len({looks[e].tobytes() for e in synthetic.WORD_ART if e != "outline"}) == len(synthetic.WORD_ART) - 1
    assert all(not np.array_equal(looks[e], plain) for e in synthetic.WORD_ART if e != "outline")
    with pytest.raises(ValueError, match="unknown word art effect 'neon'"):
        synthetic.word_art(random.Random(0), "neon", Image.new("L", (8, 8)), (0, 0, 0), (255, 255, 255), 20)
    assert set(synthetic.WORD_ART) & {"gradient", "shadow"} == set()  # the unseen renderer's effects stay its own


@pytest.mark.skipif(not tesseract.installed(), reason="tesseract-ocr is not installed")
def test_tesseract_reads_word_art_but_hollow_letters(tmp_path):
    """The decorations leave the letters whole: a classic OCR engine reads them (hollow letters are its known blind
    spot, so they are not asked of it)."""
    words, read = ["Harbor", "window", "Marble", "Quiet", "Lantern"], 0
    effects = [effect for effect in synthetic.WORD_ART if effect != "hollow"]
    for effect in effects:
        for i, word in enumerate(words):
            image = synthetic.render_text(random.Random(i), word, synthetic.TextStyle(None, 56, "plain", 0.0, 0, 0, effect=effect))
            image.save(tmp_path / f"{effect}{i}.png")
            read += tesseract.read((str(tmp_path / f"{effect}{i}.png"), 7)) == word
    assert read >= 0.8 * len(effects) * len(words), read


def test_latex_of_layout_nodes():
    assert synthetic.latex([("sup", "x", ["2"]), "+", "1"]) == "x^{2}+1"
    assert synthetic.latex([("frac", ["a", "+", "1"], [r"\alpha", "b"]), "=", ("sqrt", ["y"])]) == r"\frac{a+1}{\alpha b}=\sqrt{y}"


def test_a_fraction_is_drawn_stacked():
    flat = synthetic.render_math(random.Random(3), ["a", "+", "b"])
    stacked = synthetic.render_math(random.Random(3), [("frac", ["a"], ["b"])])
    (_, top, _, bottom), (_, stacked_top, _, stacked_bottom) = ink_box(flat), ink_box(stacked)
    assert stacked_bottom - stacked_top > 1.5 * (bottom - top)


def test_math_answers_are_latex_scored_by_the_hme_rule():
    for i in range(40):
        rng = random.Random(i)
        answer = synthetic.latex(synthetic.math_expression(rng))
        assert answer.count("{") == answer.count("}") and "\\frac{}" not in answer
        spaced = " ".join(answer)  # as HME100k writes its answers: tokens apart
        assert is_correct(f"The formula is {spaced}", [answer], "HME100k")
        assert not is_correct(spaced, [answer], "beni_other")  # spaces count outside HME100k
        assert not is_correct(spaced.upper(), [answer], "HME100k") or answer.upper() == answer  # case counts


def test_the_corpus_makes_up_half_its_words_and_the_held_out_set_none():
    def listed(vocab, draws=400):
        rng = random.Random(0)
        lists = {w.lower() for w in vocab.adjectives + vocab.nouns + vocab.verbs + vocab.first_names}
        return [synthetic.word(rng, vocab).lower() in lists for _ in range(draws)]

    corpus = listed(synthetic.CORPUS_VOCABULARY)
    assert 0.35 < corpus.count(False) / len(corpus) < 0.65
    assert all(listed(HELD_OUT))


def test_rotated_lines_follow_the_pixels_pillow_rotates():
    image = Image.new("L", (200, 100))
    image.paste(255, (146, 16, 154, 24))  # a dot centred at (150, 20)
    for degrees in (-25.0, 5.0, 40.0):
        rotated = image.rotate(degrees, Image.Resampling.BILINEAR, expand=True)
        ys, xs = np.nonzero(np.asarray(rotated) > 100)
        [(_, x, y)] = synthetic.rotated_lines([("dot", 150, 20)], image.size, degrees, rotated.size)
        assert abs(x - xs.mean()) < 1.5 and abs(y - ys.mean()) < 1.5


@pytest.mark.parametrize("kind", sorted(DOCUMENT_KINDS))
def test_documents_name_their_lines_top_to_bottom_where_their_text_is(kind):
    """Each line's centre lies on a band of ink (darker or lighter than the page around it), in reading order, and
    the answers are on the lines as printed, in the same case."""
    for seed in range(4):
        sample = synthetic.DOCUMENTS[kind](random.Random(f"{kind}:{seed}"))
        pixels = np.asarray(sample.image.convert("L")).astype(float)
        centres = [y for _, y in sample.lines]
        assert len(sample.lines) >= 3 and centres == sorted(centres) and all(0 < y < 1 for y in centres)
        for text, y in sample.lines:
            band = pixels[max(0, int(y * len(pixels)) - 2) : int(y * len(pixels)) + 3]
            assert band.std() > 8, (kind, seed, text)
        for _, answer in sample.qa:
            assert any(answer in text for text, _ in sample.lines), (kind, answer)


def test_labelled_documents_label_their_fields_in_many_ways_and_each_value_by_its_own_label():
    """The optional kind "labelled": a memo's header has each value on a line that starts with one of its own field's
    labels, the labels' words, cases, ends and order varying across memos, so only the label tells which line a
    question asks; receipts print a number and are asked it."""
    spellings, orders = {field: set() for field in synthetic.MEMO_LABELS}, set()
    for seed in range(60):
        _, header, lines = synthetic.render_memo(random.Random(seed), synthetic.CORPUS_VOCABULARY, labelled=True)
        texts = [text for text, _ in lines]
        order = []
        for field, value in header.items():
            [line] = [i for i, text in enumerate(texts) if text.endswith(" " + value) and not text.startswith("Please")]
            label = texts[line].removesuffix(" " + value)
            assert label.rstrip(":-").rstrip().lower() in {w.lower() for w in synthetic.MEMO_LABELS[field]}, (seed, label)
            spellings[field].add(label)
            order.append((line, field))
        orders.add(tuple(field for _, field in sorted(order)))
    assert all(len(labels) >= 6 for labels in spellings.values()), spellings
    assert len(orders) >= 6
    receipts = [synthetic.receipt_sample(random.Random(seed), labelled=True) for seed in range(20)]
    asked = [(r, answer) for r in receipts for question, answer in r.qa if "number" in question]
    assert asked and all(any(text.endswith(" " + answer) for text, _ in r.lines) for r, answer in asked)


def test_kinds_choose_what_the_corpus_draws(tmp_path):
    settings = CorpusSettings(samples=12, seed=7, duplicate_fraction=0.1, kinds={"digits": 1.0, "word": 1.0})
    rows = read_jsonl(generate_corpus(tmp_path, settings))
    assert {r["kind"] for r in rows} == {"digits", "word"} and len(rows) == 12
    assert all(r["transcript"] == r["conversations"][-1]["value"] for r in rows)
    assert json.loads((tmp_path / "corpus_settings.json").read_text())["kinds"] == {"digits": 1.0, "word": 1.0}
    for kind in synthetic.OPTIONAL_KINDS:  # drawn where named
        optional = read_jsonl(generate_corpus(tmp_path / kind, CorpusSettings(samples=4, kinds={kind: 1.0})))
        assert {r["kind"] for r in optional} == {kind} and all(r.get("transcript") or r.get("lines") for r in optional)
    with pytest.raises(ValueError, match=r"corpus kinds \['poem'\] are not among"):
        generate_corpus(tmp_path / "bad", CorpusSettings(samples=4, kinds={"digits": 1.0, "poem": 1.0}))
    with pytest.raises(ValueError, match="weights above 0"):
        generate_corpus(tmp_path / "bad", CorpusSettings(samples=4, kinds={"digits": 0.0}))


def test_an_arched_word_bows_with_every_letter_on_the_curve():
    font = synthetic.load_font(None, 40)  # Pillow's built-in face: the same on every machine
    middles = {}
    for bend in (0.3, -0.3):
        ink = np.asarray(widened.bow("HHHHHHHHHH", font, bend)) > 128
        rows = np.arange(ink.shape[0])[:, None]
        columns = np.array_split(np.arange(ink.shape[1]), 10)  # about a letter each
        heights = [(rows * ink[:, c]).sum() / ink[:, c].sum() for c in columns]
        assert all(ink[:, c].any() for c in columns)  # no letter lost or piled on another
        middles[bend] = (heights[4] + heights[5]) / 2 - (heights[0] + heights[9]) / 2
        # Each letter turned to the curve: the first and last lean apart, symmetric about the middle.
        assert abs(heights[1] - heights[8]) < 3 and abs(heights[0] - heights[9]) < 3
    assert middles[0.3] < -10 and middles[-0.3] > 10  # raised in the middle, or lowered
    sample = widened.arched_sample(random.Random(2))
    assert sample.kind == "arched" and sample.transcript == sample.qa[0][1] and max(sample.image.size) <= synthetic.MAX_SIDE
