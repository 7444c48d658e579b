import dagster as dg

from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.defs.training.assets import trained_model
from beni_pipeline.serve.app import answer_once


@dg.asset_check(
    asset=trained_model,
    description="The published model answers one chat request with an image through `beni serve`'s HTTP API, on loopback.",
)
def published_model_answers(layout: DataLayout) -> dg.AssetCheckResult:
    model_dir = layout.final_model
    if not (model_dir / "config.json").is_file():
        return dg.AssetCheckResult(passed=False, description=f"No published model at {model_dir}: materialize trained_model first.")
    try:
        reply = answer_once(model_dir)
    except (RuntimeError, ValueError) as e:
        return dg.AssetCheckResult(passed=False, description=str(e), metadata={"serve_command": f"beni serve {model_dir}"})
    return dg.AssetCheckResult(
        passed=reply["completion_tokens"] > 0,
        metadata={**reply, "serve_command": f"beni serve {model_dir}"},
    )
