import json
import shutil

import pytest
from PIL import Image

from beni_model.evaluate import is_correct
from beni_pipeline.prep import ocr_eval, synthetic
from beni_pipeline.prep.ocr_eval import (
    CATEGORIES,
    CATEGORY_KINDS,
    EvalSetSettings,
    Overlap,
    corpus_answers,
    find_overlaps,
    generate_eval_set,
    trained_categories,
)
from beni_pipeline.prep.synthetic import conversations, jpeg, make_sample

SETTINGS = EvalSetSettings(per_category=2, seed=3)
OCRBENCH_TYPES = {  # OCRBench's ten categories, as its `type` field names them
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
    "Handwritten Mathematical Expression Recognition",
    "Key Information Extraction",
    "Doc-oriented VQA",
    "Scene Text-centric VQA",
}


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small training corpus laid out like generate_corpus's (the same renderers and seeds)."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "images").mkdir()
    rows = []
    for i in range(40):
        sample = make_sample(0, i)
        (folder / "images" / f"{i:06d}.jpg").write_bytes(jpeg(sample.image))
        rows.append(
            {"url": f"images/{i:06d}.jpg", "caption": sample.caption, "conversations": conversations(sample.qa), "kind": sample.kind}
        )
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def eval_set(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    return generate_eval_set(folder, SETTINGS, corpus_answers(corpus))


def test_vocabularies_share_no_word_with_the_training_corpus():
    held_out = {w.lower() for w in ocr_eval.HELD_OUT_VOCABULARY}
    assert held_out and not held_out & {w.lower() for w in ocr_eval.TRAINING_VOCABULARY}


def test_set_is_ocrbench_format_with_every_category(eval_set):
    items = json.loads(eval_set.read_text())
    assert len(items) == SETTINGS.per_category * len(CATEGORIES)
    assert [i["id"] for i in items] == list(range(len(items)))
    assert {i["type"] for i in items} == set(CATEGORIES) == OCRBENCH_TYPES | {"Rotated Text Recognition"}
    for item in items:
        assert set(item) == {"dataset_name", "id", "image_path", "question", "answers", "type"}
        assert item["dataset_name"] == CATEGORIES[item["type"]][0]
        assert item["question"] and item["answers"] and all(isinstance(a, str) and a.strip() for a in item["answers"])
        with Image.open(eval_set.parent / item["image_path"]) as image:
            assert image.format == "JPEG" and 32 <= min(image.size) and max(image.size) <= 900


def test_handwritten_maths_is_scored_as_hme100k_latex(eval_set):
    items = [i for i in json.loads(eval_set.read_text()) if i["type"] == "Handwritten Mathematical Expression Recognition"]
    assert items and all(i["dataset_name"] == "HME100k" and i["question"] == synthetic.HME_QUESTION for i in items)
    for item in items:
        answer = item["answers"][0]
        assert answer.count("{") == answer.count("}")
        assert is_correct(" ".join(answer), item["answers"], item["dataset_name"])  # spaces between LaTeX tokens do not count


def test_the_corpus_asks_every_held_out_question_form(eval_set):
    """A model trained on the corpus has seen each question the held-out set asks, letter case included (key
    information aside: its questions name the document's own items)."""
    corpus_questions = {
        *synthetic.READ_QUESTIONS,
        *synthetic.MATH_QUESTIONS,
        *synthetic.MEMO_QUESTIONS.values(),
        *synthetic.SIGN_QUESTIONS.values(),
    }
    for item in json.loads(eval_set.read_text()):
        if item["type"] != "Key Information Extraction":
            assert item["question"] in corpus_questions, item


def test_same_seed_same_files_other_seed_other_items(eval_set, corpus, tmp_path):
    again = generate_eval_set(tmp_path / "again", SETTINGS, corpus_answers(corpus))
    assert files(again.parent) == files(eval_set.parent)
    other = generate_eval_set(tmp_path / "other", EvalSetSettings(per_category=2, seed=4))
    assert [i["answers"] for i in json.loads(other.read_text())] != [i["answers"] for i in json.loads(eval_set.read_text())]


def test_no_overlap_with_the_corpus(eval_set, corpus):
    assert find_overlaps(eval_set, eval_set.parent, corpus) == []


def test_overlap_check_finds_a_shared_image_and_a_shared_answer(eval_set, corpus, tmp_path):
    items = json.loads(eval_set.read_text())
    planted = tmp_path / "corpus"
    shutil.copytree(corpus.parent, planted)
    shutil.copy(eval_set.parent / items[3]["image_path"], planted / "images" / "copied.jpg")
    rows = [
        {"url": "images/copied.jpg", "caption": "a copy", "conversations": []},
        # the same answer, up to OCRBench's normalization
        {
            "url": "images/000000.jpg",
            "caption": "x",
            "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": f"  {items[7]['answers'][0].upper()} "}],
        },
    ]
    with (planted / "corpus.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert find_overlaps(eval_set, eval_set.parent, planted / "corpus.jsonl") == [
        Overlap(3, "image", items[3]["image_path"]),
        Overlap(7, "text", items[7]["answers"][0]),
    ]


def test_excluded_answers_are_redrawn(eval_set, tmp_path):
    items = json.loads(eval_set.read_text())
    taken = {ocr_eval.answer_key(items[0]["answers"][0]), ocr_eval.answer_key(items[5]["answers"][0])}
    redrawn = json.loads(generate_eval_set(tmp_path, SETTINGS, taken).read_text())
    assert len(redrawn) == len(items)
    assert not {ocr_eval.answer_key(i["answers"][0]) for i in redrawn} & taken


def test_every_category_is_taught_by_corpus_kinds_and_a_corpus_names_the_ones_it_teaches(corpus, tmp_path):
    assert CATEGORY_KINDS.keys() == CATEGORIES.keys()
    assert (
        set(synthetic.KINDS)
        <= {kind for kinds in CATEGORY_KINDS.values() for kind in kinds}
        <= {*synthetic.KINDS, *synthetic.OPTIONAL_KINDS}
    )
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert trained_categories(corpus) == {c for c, kinds in CATEGORY_KINDS.items() if any(r["kind"] in kinds for r in rows)}
    digits = tmp_path / "digits.jsonl"
    digits.write_text("".join(json.dumps(r) + "\n" for r in rows if r["kind"] == "digits"))
    assert trained_categories(digits) == {"Digit String Recognition"}
