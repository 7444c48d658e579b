import json
import random
import shutil

import pytest
from PIL import Image, ImageDraw, ImageFont

from beni_model.evaluate import is_correct
from beni_pipeline.prep import fonts, synthetic, tesseract
from beni_pipeline.prep.fonts import FontsMissing, check_disjoint, corpus_fonts, split_fonts
from beni_pipeline.prep.ocr_eval import CATEGORIES, EvalSetSettings, generate_eval_set
from beni_pipeline.prep.unseen_eval import Fonts, categories, make_unseen_set
from tests.conftest import SMALL_FONT_PACKAGES


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_splits_share_no_package_and_the_unseen_split_has_every_style_its_set_draws():
    assert not fonts.TRAIN_PACKAGES.keys() & fonts.UNSEEN_PACKAGES.keys()
    styles = {style for listed in fonts.UNSEEN_PACKAGES.values() for style in listed.split()}
    assert {"hand", "mono", "serif", "sans"} <= styles
    assert all(package in fonts.TRAIN_PACKAGES or package in fonts.UNSEEN_PACKAGES for package in SMALL_FONT_PACKAGES)


def test_fetch_unpacks_each_package_and_lists_its_fonts(fonts_root):
    manifest = json.loads((fonts_root / "manifest.json").read_text())
    assert set(manifest) == set(SMALL_FONT_PACKAGES)
    for package, entry in manifest.items():
        assert entry["split"] == ("train" if package in fonts.TRAIN_PACKAGES else "unseen") and entry["files"]
        assert all((fonts_root / f).is_file() and f.startswith(f"{package}/") for f in entry["files"])
    train, unseen = split_fonts(fonts_root, "train"), split_fonts(fonts_root, "unseen")
    assert not set(train) & set(unseen) and not fonts.families(train) & fonts.families(unseen)
    assert split_fonts(fonts_root, "unseen", "hand") == tuple(str(fonts_root / f) for f in manifest["fonts-rufscript"]["files"])
    check_disjoint(fonts_root)


def test_the_corpus_takes_at_most_a_few_faces_of_a_package_its_families_before_their_weights(fonts_root, monkeypatch):
    hermit = [str(fonts_root / f"fonts-hermit/Hermit-{w}.otf") for w in ("bold", "light", "medium")]
    goudy = str(fonts_root / "fonts-goudybookletter/GoudyBookletter1911.otf")
    assert fonts.faces([*hermit, goudy], limit=2) == [goudy, hermit[0]]  # one face of each family first
    assert fonts.faces([*hermit, goudy], limit=9) == [goudy, hermit[0], hermit[1], hermit[2]]
    assert set(corpus_fonts(fonts_root)) == set(split_fonts(fonts_root, "train"))  # two one-face packages
    monkeypatch.setattr(fonts, "FACES_PER_PACKAGE", 0)
    assert corpus_fonts(fonts_root) == ()


def test_a_family_in_both_splits_fails(fonts_root, tmp_path):
    root = tmp_path / "fonts"
    shutil.copytree(fonts_root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["fonts-oxygen"] = {"split": "unseen", "style": "sans", "files": manifest["fonts-kristi"]["files"], "dropped": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"in both the train and the unseen split .*: move their packages into one split"):
        check_disjoint(root)


def test_without_fetched_fonts_the_corpus_uses_the_machines_and_no_unseen_set_is_made(tmp_path):
    with pytest.raises(FontsMissing, match="python -m beni_pipeline.prep.fonts fetch"):
        split_fonts(tmp_path, "train")
    assert corpus_fonts(tmp_path) == () and corpus_fonts(None) == ()
    assert make_unseen_set(tmp_path / "unseen", tmp_path, EvalSetSettings(per_category=1)) is None


def test_the_corpus_and_each_set_open_only_their_own_splits_fonts(fonts_root, tmp_path, monkeypatch):
    opened, truetype = [], ImageFont.truetype

    def spy(font, *args, **kwargs):
        opened.append(str(font))
        return truetype(font, *args, **kwargs)

    monkeypatch.setattr(ImageFont, "truetype", spy)
    synthetic.load_font.cache_clear()
    train = set(split_fonts(fonts_root, "train"))
    with synthetic.using_fonts(corpus_fonts(fonts_root)):
        for index in range(30):
            synthetic.make_sample(5, index, letter_spacing=True)
    generate_eval_set(tmp_path / "heldout", EvalSetSettings(per_category=1, fonts=corpus_fonts(fonts_root)))
    assert opened and set(opened) <= train
    opened.clear()
    make_unseen_set(tmp_path / "unseen", fonts_root, EvalSetSettings(per_category=1))
    assert opened and set(opened) <= set(split_fonts(fonts_root, "unseen"))
    synthetic.load_font.cache_clear()


def test_the_unseen_set_has_every_category_and_is_a_function_of_its_seed(fonts_root, tmp_path):
    eval_json = make_unseen_set(tmp_path / "a", fonts_root, EvalSetSettings(per_category=2, seed=1))
    items = json.loads(eval_json.read_text())
    assert [i["type"] for i in items[::2]] == list(CATEGORIES) and [i["id"] for i in items] == list(range(len(items)))
    assert all(i["dataset_name"].startswith("unseen_") or i["dataset_name"] == "HME100k" for i in items)
    assert {i["dataset_name"] for i in items}.isdisjoint({name for name, _ in CATEGORIES.values()} - {"HME100k"})
    for item in items:
        with Image.open(tmp_path / "a" / item["image_path"]) as image:
            assert image.format == "JPEG" and max(image.size) <= 800 and item["answers"][0].strip()
    make_unseen_set(tmp_path / "b", fonts_root, EvalSetSettings(per_category=2, seed=1))
    assert files(tmp_path / "a") == files(tmp_path / "b")
    # Without the camera: the same items, each image as drawn (not JPEG-blurred: sharper, and every one different).
    drawn = json.loads(make_unseen_set(tmp_path / "c", fonts_root, EvalSetSettings(per_category=2, seed=1), camera=False).read_text())
    assert drawn == items
    for item in items:
        with Image.open(tmp_path / "a" / item["image_path"]) as shot, Image.open(tmp_path / "c" / item["image_path"]) as flat:
            assert shot.size == flat.size and shot.tobytes() != flat.tobytes()
    assert list(categories(Fonts.unseen(fonts_root))) == list(CATEGORIES)


def word_set(folder, font_path: str, words: list[str]):
    """A set of large dark words on white: what any OCR engine should read."""
    (folder / "images").mkdir(parents=True)
    items = []
    for i, text in enumerate(words):
        image = Image.new("RGB", (420, 110), "white")
        ImageDraw.Draw(image).text((20, 20), text, font=ImageFont.truetype(font_path, 56), fill="black")
        image.save(folder / "images" / f"{i}.png")
        item = {
            "dataset_name": "words",
            "id": i,
            "image_path": f"images/{i}.png",
            "question": "what is written in the image?",
            "answers": [text],
        }
        items.append({**item, "type": "Regular Text Recognition"})
    (folder / "ocr_eval.json").write_text(json.dumps(items))
    return folder / "ocr_eval.json"


@pytest.mark.skipif(not tesseract.installed(), reason="tesseract-ocr is not installed")
def test_tesseract_reads_clean_words_scored_by_the_same_rule(fonts_root, tmp_path):
    serif = split_fonts(fonts_root, "unseen", "serif")[0]
    eval_json = word_set(tmp_path / "set", serif, ["harbor", "window", "31415"])
    summary = tesseract.score(eval_json, tmp_path / "set")
    assert summary["total"] == 3 and summary["correct"] >= 2
    assert summary["by_type"]["Regular Text Recognition"]["correct"] == summary["correct"]
    assert summary["fingerprint"] == tesseract.fingerprint(eval_json, tmp_path / "set")
    assert tesseract.main([str(tmp_path / "scores.json"), str(tmp_path / "set")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores[summary["fingerprint"]]["correct"] == summary["correct"] and scores[summary["fingerprint"]]["set"] == str(
        tmp_path / "set"
    )
    Image.new("RGB", (420, 110), "white").save(tmp_path / "set" / "images" / "2.png")  # the same items, another image
    assert tesseract.fingerprint(eval_json, tmp_path / "set") != summary["fingerprint"]
    assert is_correct("harbor window", ["harbor"], "words")


def test_without_tesseract_scoring_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not tesseract.installed()
    with pytest.raises(RuntimeError, match=r"tesseract is not installed: `apt-get install tesseract-ocr`"):
        tesseract.score(tmp_path / "ocr_eval.json", tmp_path)


def test_letter_spacing_changes_only_the_spaced_samples():
    plain = [synthetic.make_sample(2, i, {"word": 1, "sign": 1}) for i in range(16)]
    spaced = [synthetic.make_sample(2, i, {"word": 1, "sign": 1}, letter_spacing=True) for i in range(16)]
    same = [a.image.tobytes() == b.image.tobytes() for a, b in zip(plain, spaced)]
    assert [a.qa[0][1] for a in plain] == [b.qa[0][1] for b in spaced]  # the same texts, some drawn spaced
    assert all(same[i] for i, s in enumerate(plain) if s.kind == "sign") and not all(same)
    rng = random.Random(0)
    wide = synthetic.render_text(rng, "harbor", synthetic.TextStyle(None, 32, "plain", 0.0, 0.0, 0, tracking=0.5))
    assert wide.width > synthetic.render_text(random.Random(0), "harbor", synthetic.TextStyle(None, 32, "plain", 0.0, 0.0, 0)).width


def test_a_corpus_names_the_fonts_it_was_drawn_with(fonts_root, tmp_path):
    assert synthetic.corpus_fonts_of(tmp_path / "none") is None
    train = corpus_fonts(fonts_root)
    for fonts_used in (train, ()):
        folder = tmp_path / str(len(fonts_used))
        synthetic.generate_corpus(folder, synthetic.CorpusSettings(samples=2, kinds={"digits": 1.0}, fonts=fonts_used))
        assert synthetic.corpus_fonts_of(folder) == fonts_used
