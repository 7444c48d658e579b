import json
from pathlib import Path

import dagster as dg
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_pipeline.defs.evaluation.assets import CPU_RECIPE, EvalConfig, heldout_eval_set, ocr_eval_report, report_covers_every_sample
from beni_pipeline.defs.export.assets import quantized_exports
from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.prep import tesseract
from beni_pipeline.prep.ocr_eval import CATEGORIES
from beni_pipeline.prep.synthetic import CorpusSettings, generate_corpus
from tests.model.conftest import CHATML, TEXT, VISION, train_tokenizer
from tests.pipeline.conftest import materialize, run_check

EVAL_SET = {"per_category": 1}
EVAL = {"batch_size": 8, "max_new_tokens": 4, "device": "cpu"}


def save_tiny_model(folder: Path) -> None:
    """A tiny random beni model with the ocr extension (as the CPU recipe trains) saved where trained_model leaves its
    final model."""
    parts = folder.parent / "parts"
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CHATML)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **TEXT)).save_pretrained(parts / "llama")
    tokenizer.save_pretrained(parts / "llama")
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(parts / "siglip")
    config = BeniConfig(vision_model=str(parts / "siglip"), text_model=str(parts / "llama"), extensions={"ocr": {}})
    tokenizer = load_tokenizer(str(parts / "llama"))
    BeniForConditionalGeneration.from_parts(config, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture
def data(instance):
    return DataLayout().base


def metadata_of(result, key: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_eval_report_and_exports_of_the_trained_model(data):
    save_tiny_model(data / "model" / "final")
    run_config = {
        "ops": {
            "heldout_eval_set": {"config": EVAL_SET},
            "ocr_eval_report": {"config": EVAL},
            "quantized_exports": {"config": {**EVAL, "schemes": ["nf4"]}},  # every scheme round-trips in tests/model/test_quantize.py
        }
    }
    corpus = generate_corpus(data / "corpus", CorpusSettings(samples=4, kinds={"digits": 1.0}))  # as source_manifest makes it
    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("source_manifest", metadata={"sources": dg.MetadataValue.json([str(corpus)])})
        )
        instance.report_runless_asset_event(dg.AssetMaterialization("trained_model", metadata={"recipe": CPU_RECIPE}))
        result = materialize(
            [heldout_eval_set, ocr_eval_report, report_covers_every_sample, quantized_exports], instance=instance, run_config=run_config
        )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"report_covers_every_sample": True}
    assert metadata_of(result, "heldout_eval_set")["unseen_set"].startswith(f"not made: no fetched fonts at {DataLayout().fonts}")

    report = metadata_of(result, "ocr_eval_report")
    assert "minutes on a CPU: only the categories its corpus trains on can score" in report["title"]
    assert report["title"] in (data / "ocr_eval" / "report" / "report.md").read_text()
    total = len(CATEGORIES)
    assert report["total"] == total and report["score"].startswith(f"{report['correct']}/{total} ")
    categories = {r.data["type"]: r.data for r in report["by_category"].records}
    assert set(categories) == set(CATEGORIES) and sum(c["total"] for c in categories.values()) == total
    assert sum(c["correct"] for c in categories.values()) == report["correct"]
    assert {k for k, c in categories.items() if c["trained_on"]} == {"Digit String Recognition"} and report["categories_trained_on"] == 1
    assert report["score"].endswith(f"; {total - 1} categories not trained on")
    assert Path(report["report"]).read_text().count(" no: the training data has none |") == total - 1
    assert 0 <= report["head_accuracy"] <= 1 and all(0 <= c["head_accuracy"] <= 1 for c in categories.values())
    shown = report["right_answers"].count("data:image/jpeg;base64,") + report["wrong_answers"].count("data:image/jpeg;base64,")
    assert shown == min(4, report["correct"]) + min(4, total - report["correct"])
    predictions = [json.loads(line) for line in Path(report["predictions"]).read_text().splitlines()]
    assert len(predictions) == total and sum(p["correct"] for p in predictions) == report["correct"]

    exports = metadata_of(result, "quantized_exports")
    rows = {r.data["name"]: r.data for r in exports["exports"].records}
    assert list(rows) == ["reference", "nf4", "llava"]
    assert rows["nf4"]["size_mb"] < rows["reference"]["size_mb"] and rows["llava"]["score_delta"] == 0
    assert all(r["total"] == total and r["tokens_per_s"] > 0 for r in rows.values())
    assert (data / "exports" / "nf4" / "model.safetensors").is_file() and (data / "exports" / "llava" / "config.json").is_file()
    assert exports["serve"] == f"- `beni serve {data / 'exports' / 'nf4'}`\n- `beni serve {data / 'exports' / 'llava'}`"

    # The check fails once the report lacks a sample.
    report_dir = data / "ocr_eval" / "report"
    lines = (report_dir / "predictions.jsonl").read_text().splitlines()
    (report_dir / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with dg.DagsterInstance.get() as instance:
        evaluation = run_check(ocr_eval_report, report_covers_every_sample, instance)
    assert not evaluation.passed and evaluation.metadata["missing"].value == 1


def test_both_sets_side_by_side_with_tesseract_beside_them(data, fonts_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BENI_FONTS", str(fonts_root))
    save_tiny_model(data / "model" / "final")
    report_config = {"ops": {"ocr_eval_report": {"config": {**EVAL, "tesseract": True}}}}
    run_config = {"ops": {"heldout_eval_set": {"config": EVAL_SET}, **report_config["ops"]}}
    with dg.DagsterInstance.get() as instance:
        result = materialize([heldout_eval_set, ocr_eval_report], instance=instance, run_config=run_config)
    sets, report = metadata_of(result, "heldout_eval_set"), metadata_of(result, "ocr_eval_report")
    assert sets["unseen_items"] == sets["unseen_no_camera_items"] == sets["items"] == len(CATEGORIES)
    assert report["unseen_score"].startswith(f"{round(report['unseen_accuracy'] * len(CATEGORIES))}/{len(CATEGORIES)} ")
    comparison = json.loads((data / "ocr_eval" / "comparison" / "comparison.json").read_text())
    rows = {r["type"]: r for r in comparison["rows"]}
    assert list(rows) == [*sorted(CATEGORIES), "all"]
    assert rows["all"]["held-out set"] == report["accuracy"] and rows["all"]["unseen renderer"] == report["unseen_accuracy"]
    assert rows["all"]["unseen renderer, no camera"] == report["unseen_no_camera_accuracy"]
    assert rows["all"]["gap"] == round(100 * (report["accuracy"] - report["unseen_accuracy"]), 1) == report["gap_points"]
    assert report["comparison"].startswith(f"held-out set {100 * report['accuracy']:.1f}% | unseen renderer ")
    assert report["side_by_side"].count("\n") == len(CATEGORIES) + 3  # header, rule, categories, all
    if tesseract.installed():  # scored here, every set, and kept by fingerprint for the next report
        assert report["tesseract"].startswith("scored by the same rule: held-out set ")
        assert len(json.loads((data / "ocr_eval" / "tesseract.json").read_text())) == 3
        names = ("held-out set", "unseen renderer", "unseen renderer, no camera")
        assert all(0 <= rows["all"][f"tesseract, {name}"] <= 1 for name in names)
        monkeypatch.setenv("PATH", str(tmp_path))  # a machine without it takes the kept scores
        with dg.DagsterInstance.get() as instance:
            again = materialize([ocr_eval_report], instance=instance, run_config=report_config)
        assert metadata_of(again, "ocr_eval_report")["tesseract"] == report["tesseract"]
        (data / "ocr_eval" / "tesseract.json").unlink()
        with dg.DagsterInstance.get() as instance:
            report = metadata_of(materialize([ocr_eval_report], instance=instance, run_config=report_config), "ocr_eval_report")
    assert report["tesseract"].startswith("tesseract not installed (apt-get install tesseract-ocr)")
    assert "python -m beni_pipeline.prep.tesseract" in report["tesseract"]


def test_without_a_trained_model_the_assets_say_so(data):
    with dg.DagsterInstance.get() as instance:
        result = materialize(
            [ocr_eval_report], instance=instance, raise_on_error=False, run_config={"ops": {"ocr_eval_report": {"config": EVAL}}}
        )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "No trained model at" in str(failure.event_specific_data.error) and "materialize trained_model first" in str(
        failure.event_specific_data.error
    )


def test_without_an_eval_set_the_report_says_so(data):
    save_tiny_model(data / "model" / "final")
    with dg.DagsterInstance.get() as instance:
        result = materialize(
            [ocr_eval_report], instance=instance, raise_on_error=False, run_config={"ops": {"ocr_eval_report": {"config": EVAL}}}
        )
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "materialize heldout_eval_set first" in str(failure.event_specific_data.error)


def test_half_configured_ocrbench_is_refused(data):
    config = {"ocrbench_json": "/nowhere/OCRBench.json"}
    with dg.DagsterInstance.get() as instance:
        result = materialize(
            [heldout_eval_set], instance=instance, raise_on_error=False, run_config={"ops": {"heldout_eval_set": {"config": config}}}
        )
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "Set both ocrbench_json and ocrbench_images" in str(failure.event_specific_data.error)


def test_eval_batch_size_follows_the_device_unless_set():
    assert EvalConfig(device="cpu").eval_settings().batch_size == 16
    assert EvalConfig(device="cuda:0").eval_settings().batch_size == 256
    assert EvalConfig(device="cuda", batch_size=8).eval_settings().batch_size == 8
