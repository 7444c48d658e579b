import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from beni_model.evaluate import (
    EvalSettings,
    evaluate,
    generate_tokens,
    is_correct,
    load_for_eval,
    load_set,
    read_predictions,
    report_markdown,
    score_line,
    similarity,
    summarize,
)
from beni_model.export import export_llava
from beni_model.ocr.heads import READS_PER_COLUMN, reading_classes
from tests.model.conftest import processor_of

# ---------------------------------------------------------------- OCRBench's rule, by hand


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("The word is CENTRE.", "CENTRE", True),  # case-insensitive substring
        ("centr", "CENTRE", False),  # the answer must be inside the prediction, not the other way round
        ("total: 12,50", ["12.50", "12,50"], True),  # any of the answers
        ("total: 12", ["12.50", "12,50"], False),
        ("Hello World", "hello\nworld", True),  # newlines in the answer become spaces
        ("hello\nworld!", "Hello World", True),  # and in the prediction
        ("OPEN", "  open ", True),  # stripped
        ("abcd", "ab cd", False),  # spaces count outside HME100k
        ("", "x", False),
    ],
)
def test_rule_for_most_sets(prediction, answers, expected):
    assert is_correct(prediction, answers, "IIIT5K") is expected


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("x^{2} + 1", "x ^ { 2 }", True),  # spaces removed from both
        ("x\n+1", "x+1", True),  # newlines removed too
        ("\\frac{A}{b}", "\\frac{a}{b}", False),  # case kept
        ("y = \\frac{a}{b}", ["\\frac{A}{b}", "\\frac { a } { b }"], True),
    ],
)
def test_rule_for_handwritten_maths(prediction, answers, expected):
    assert is_correct(prediction, answers, "HME100k") is expected


def test_only_hme100k_keeps_case():
    assert is_correct("\\frac{A}{b}", "\\frac{a}{b}", "docVQA")
    assert not is_correct("x^{2}", "x ^ { 2 }", "docVQA")


def test_similarity_tells_partial_reading_from_none():
    assert similarity("COPPER", "copper", "IIIT5K") == 1.0
    assert similarity("the sign says COPPEX", ["zinc", "copper"], "IIIT5K") > similarity("COPPEX", "zinc", "IIIT5K")
    assert 0.5 < similarity("COPPEX", "copper", "IIIT5K") < 1.0
    assert similarity("1011", "copper", "IIIT5K") == 0.0
    assert similarity("x ^ { 2 }", "x^{2}", "HME100k") == 1.0  # normalized as the scoring rule normalizes


def test_summary_counts_by_category_and_scores_the_real_set_out_of_1000():
    records = [
        {"type": "Digit String Recognition", "dataset_name": "ORAND", "correct": i % 3 == 0, "similarity": 0.5 * (i % 2)}
        for i in range(999)
    ]
    records.append({"type": "Key Information Extraction", "dataset_name": "SROIE", "correct": True, "similarity": 1.0})
    summary = summarize(records)
    assert summary["correct"] == 334 and summary["total"] == 1000 and summary["ocrbench_score"] == 334
    assert summary["by_type"]["Digit String Recognition"] == {"correct": 333, "total": 999, "accuracy": 0.3333, "similarity": 0.25}
    assert summary["by_dataset"]["SROIE"] == {"correct": 1, "total": 1, "accuracy": 1.0, "similarity": 1.0}
    assert summary["similarity"] == round((499 * 0.5 + 1.0) / 1000, 3)
    assert "ocrbench_score" not in summarize(records[:10])


def test_summary_marks_the_categories_the_training_data_lacks():
    item = {"question": "what is written in the image?", "answers": ["0"], "prediction": "0"}
    records = [
        {**item, "type": "Digit String Recognition", "dataset_name": "beni_digits", "correct": i < 3, "similarity": 1.0} for i in range(4)
    ]
    records += [{**item, "type": "Doc-oriented VQA", "dataset_name": "beni_memo", "correct": False, "similarity": 0.0} for _ in range(6)]
    summary = summarize(records, trained={"Digit String Recognition", "Regular Text Recognition"})
    assert summary["by_type"]["Digit String Recognition"]["trained_on"] and not summary["by_type"]["Doc-oriented VQA"]["trained_on"]
    assert summary["trained_on"] == {"categories": ["Digit String Recognition"], "correct": 3, "total": 4, "accuracy": 0.75}
    assert score_line(summary).endswith("; trained on: Digit String Recognition 3/4 (75.0%); 1 categories not trained on")
    report = report_markdown(summary | {"eval_set": "set.json", "samples_per_s": 1, "tokens_per_s": 1}, records, "t")
    assert "| Doc-oriented VQA | 0 | 6 | 0.0% | 0.00 | no: the training data has none |" in report
    assert "| Digit String Recognition | 3 | 4 | 75.0% | 1.00 | yes |" in report
    assert "trained_on" not in summarize(records) and "trained on" not in score_line(summarize(records))


# ---------------------------------------------------------------- a small OCRBench-format set


ITEMS = [
    ("IIIT5K", "what is written in the image?", "CENTRE", "Regular Text Recognition"),
    ("ORAND", "what is written in the image?", ["12345"], "Digit String Recognition"),
    ("docVQA", "What is the date on the letter, if there is one at all?", ["1 May", "May 1"], "Doc-oriented VQA"),
    (
        "HME100k",
        "Please write out the expression of the formula in the image using LaTeX format.",
        "x ^ { 2 }",
        "Handwritten Mathematical Expression Recognition",
    ),
    ("SROIE", "What is the total?", ["9.99"], "Key Information Extraction"),
]


def write_set(folder: Path) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    items = []
    for i, (dataset, question, answers, kind) in enumerate(ITEMS):
        image = Image.new("RGB", (96 + 16 * i, 64), (240, 240, 230))
        ImageDraw.Draw(image).text((8, 24), str(answers), fill=(0, 0, 0))
        image.save(folder / "img" / f"{i}.png")
        items.append(
            {"dataset_name": dataset, "id": i, "image_path": f"img/{i}.png", "question": question, "answers": answers, "type": kind}
        )
    path = folder / "set.json"
    path.write_text(json.dumps(items))
    return path


def test_load_set_says_what_is_wrong(tmp_path):
    path = write_set(tmp_path)
    assert len(load_set(path, tmp_path)) == len(ITEMS)
    with pytest.raises(FileNotFoundError, match="not under"):
        load_set(path, tmp_path / "elsewhere")
    items = json.loads(path.read_text())
    del items[2]["answers"]
    path.write_text(json.dumps(items))
    with pytest.raises(ValueError, match=r"Item 2 .* lacks \['answers'\]"):
        load_set(path, tmp_path)


def save_test_model(build, folder: Path) -> Path:
    """A tiny model with weights large enough that its greedy answers depend on the image and the question (at the
    usual init scale it answers every prompt with the same token), saved like trained_model saves it."""
    model, tokenizer = build()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=generator)
    model.save_pretrained(folder)
    processor_of(model, tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_model(build, tmp_path_factory):
    return save_test_model(build, tmp_path_factory.mktemp("model") / "final")


def test_end_to_end_report_is_complete_and_consistent(saved_model, tmp_path):
    path = write_set(tmp_path)
    model, tokenizer = load_for_eval(saved_model, "cpu")
    result = evaluate(model, tokenizer, path, tmp_path, tmp_path / "out", EvalSettings(batch_size=2, max_new_tokens=6))
    records = read_predictions(result.predictions)
    assert [r["id"] for r in records] == list(range(len(ITEMS)))
    for record, (dataset, question, answers, kind) in zip(records, ITEMS):
        assert (record["dataset_name"], record["question"], record["answers"], record["type"]) == (dataset, question, answers, kind)
        assert isinstance(record["prediction"], str)
        assert record["correct"] == is_correct(record["prediction"], answers, dataset)
        assert record["similarity"] == round(similarity(record["prediction"], answers, dataset), 3)
    summary = json.loads(result.summary_path.read_text())
    assert summary["total"] == len(ITEMS) and summary["correct"] == sum(r["correct"] for r in records)
    assert sum(v["total"] for v in summary["by_type"].values()) == len(ITEMS)
    assert 0 < summary["generated_tokens"] <= 6 * len(ITEMS) and summary["tokens_per_s"] > 0
    report = result.report.read_text()
    assert f"{summary['correct']}/{len(ITEMS)}" in report and all(kind in report for *_, kind in ITEMS)


def test_batching_and_left_padding_change_no_token(saved_model, tmp_path):
    path = write_set(tmp_path)
    model, tokenizer = load_for_eval(saved_model, "cpu")
    items = load_set(path, tmp_path)
    alone = [generate_tokens(model, tokenizer, [item], tmp_path, EvalSettings(1, 6))[0][0] for item in items]
    together = generate_tokens(model, tokenizer, items, tmp_path, EvalSettings(len(items), 6))[0]
    assert together == alone and len({tuple(t) for t in alone}) > 1  # answers that differ, so order matters


def test_the_compiled_decode_setting_gives_the_same_tokens(saved_model, tmp_path):
    path = write_set(tmp_path)
    model, processor = load_for_eval(saved_model, "cpu")
    items = load_set(path, tmp_path)
    dynamic, static = (generate_tokens(model, processor, items, tmp_path, EvalSettings(4, 6, compile)) for compile in (False, True))
    assert static == dynamic


def test_llava_export_answers_like_the_beni_model(saved_model, tmp_path):
    path = write_set(tmp_path)
    settings = EvalSettings(batch_size=len(ITEMS), max_new_tokens=6)
    model, processor = load_for_eval(saved_model, "cpu")
    beni = evaluate(model, processor, path, tmp_path, tmp_path / "beni", settings)
    export_llava(model, tmp_path / "llava", processor)
    llava, llava_tokenizer = load_for_eval(tmp_path / "llava", "cpu")
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    exported = evaluate(llava, llava_tokenizer, path, tmp_path, tmp_path / "llava_eval", settings)
    assert [r["prediction"] for r in read_predictions(exported.predictions)] == [
        r["prediction"] for r in read_predictions(beni.predictions)
    ]
    assert exported.summary["generated_tokens"] == beni.summary["generated_tokens"]


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at"):
        load_for_eval(tmp_path / "nothing", "cpu")


def test_a_reading_head_has_its_own_transcripts_scored_by_category(build, tmp_path):
    model, tokenizer = build(extensions={"ocr": {}})
    head = model.extensions["ocr"].reading_head.classify
    with torch.no_grad():  # every column reads "1", then a blank: the head's transcript is "1111" (4 columns)
        head.weight.zero_()
        bias = head.bias.view(READS_PER_COLUMN, -1)
        bias.fill_(-10)
        bias[0, reading_classes("1")[0]] = 10
        bias[1, 0] = 10
    (tmp_path / "img").mkdir()
    items = []
    for i, (answer, kind) in enumerate([("11", "Digit String Recognition"), ("2", "Regular Text Recognition")]):
        Image.new("RGB", (64, 32), (240, 240, 230)).save(tmp_path / "img" / f"{i}.png")
        items.append(
            {
                "dataset_name": "IIIT5K",
                "id": i,
                "image_path": f"img/{i}.png",
                "question": "what is written?",
                "answers": [answer],
                "type": kind,
            }
        )
    (tmp_path / "set.json").write_text(json.dumps(items))
    processor = processor_of(model, tokenizer)
    result = evaluate(model, processor, tmp_path / "set.json", tmp_path, tmp_path / "out", EvalSettings(batch_size=2, max_new_tokens=2))
    records = read_predictions(result.predictions)
    assert [(r["head_answer"], r["head_correct"]) for r in records] == [("1111", True), ("1111", False)]
    assert result.summary["head_accuracy"] == 0.5
    assert [v["head_accuracy"] for v in result.summary["by_type"].values()] == [1.0, 0.0]
    assert "extension head" in result.report.read_text()
