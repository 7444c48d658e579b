import json

import pytest

from beni_model.evaluate import EvalSettings, read_predictions
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.quantize import (
    SCHEMES,
    ExportError,
    QuantizeSettings,
    check_quantized,
    export_all,
    raise_if_broken,
    score_exports,
    unavailable,
)
from tests.model.test_evaluate import ITEMS, save_test_model, write_set

LLM_LINEARS = 2 * 7  # two decoder layers of q, k, v, o, gate, up, down; lm_head stays in full precision
SETTINGS = EvalSettings(batch_size=len(ITEMS), max_new_tokens=4)


@pytest.fixture(scope="module")
def saved_model(build, tmp_path_factory):
    return save_test_model(build, tmp_path_factory.mktemp("model") / "final")


@pytest.fixture(scope="module")
def exports(saved_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    eval_json = write_set(folder / "set")
    return export_all(saved_model, folder / "out", eval_json, folder / "set", QuantizeSettings(eval=SETTINGS), "cpu"), folder


def test_every_export_round_trips_on_cpu(exports, saved_model):
    report, folder = exports
    reasons = {s: unavailable(s, "cpu") for s in SCHEMES}
    assert report.skipped == {s: r for s, r in reasons.items() if r}  # on a CPU without a backend: skipped, with why
    exported = [s for s in SCHEMES if not reasons[s]]
    rows = {r["name"]: r for r in report.rows}
    assert list(rows) == ["reference", *exported, "llava"]
    reference = rows["reference"]
    for name, row in rows.items():
        assert "error" not in row
        assert row["total"] == len(ITEMS) and row["load_s"] > 0 and row["tokens_per_s"] > 0
        assert row["score_delta"] == row["correct"] - reference["correct"]
        assert (folder / "out" / "scores" / name / "predictions.jsonl").is_file()
    for scheme in exported:
        assert rows[scheme]["quantized_layers"] == LLM_LINEARS
        assert rows[scheme]["size_mb"] < reference["size_mb"]
        config = json.loads((folder / "out" / scheme / "config.json").read_text())
        assert "quantization_config" in config
    # The LLaVA export holds the same weights: the same answers.
    assert rows["llava"]["quantized_layers"] == 0 and rows["llava"]["size_mb"] == pytest.approx(reference["size_mb"], rel=0.01)
    predictions = {
        n: [r["prediction"] for r in read_predictions(folder / "out" / "scores" / n / "predictions.jsonl")] for n in ("reference", "llava")
    }
    assert predictions["llava"] == predictions["reference"]


def test_a_broken_export_fails_with_one_clear_sentence(exports):
    _, folder = exports
    broken = folder / "out" / SCHEMES[-1]
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # The fresh process's body, run here: the test process has paid for the imports already.
    rows = score_exports({SCHEMES[-1]: broken}, folder / "set" / "set.json", folder / "set", folder / "rescore", SETTINGS, "cpu")
    with pytest.raises(ExportError, match=rf"^The {SCHEMES[-1]} export at .* is broken: \w+Error: ") as error:
        raise_if_broken(rows)
    assert "\n" not in str(error.value)


def test_an_export_that_quantized_nothing_is_refused(saved_model):
    model = BeniForConditionalGeneration.from_pretrained(saved_model)
    with pytest.raises(ExportError, match="holds no quantized layer"):
        check_quantized(model, "nf4", saved_model)


def test_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="Unknown quantization scheme 'int3'"):
        unavailable("int3", "cpu")
