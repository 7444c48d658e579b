import dagster as dg

from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.defs.training.assets import trained_model
from beni_pipeline.defs.training.checks import published_model_answers
from tests.pipeline.conftest import run_check
from tests.pipeline.test_eval_export_assets import save_tiny_model


def check(instance) -> dg.AssetCheckEvaluation:
    return run_check(trained_model, published_model_answers, instance)


def test_the_published_model_answers_through_the_server(instance, tmp_path):
    missing = check(instance)
    assert not missing.passed and "materialize trained_model first" in missing.description
    save_tiny_model(DataLayout().final_model)  # with the ocr extension, as the CPU recipe trains it
    evaluation = check(instance)
    metadata = {k: v.value for k, v in evaluation.metadata.items()}
    assert evaluation.passed and metadata["completion_tokens"] > 0 and metadata["prompt_tokens"] > metadata["completion_tokens"]
    assert metadata["serve_command"] == f"beni serve {DataLayout().final_model}"
