import dagster as dg
import pydantic

from beni_model.quantize import SCHEMES, ExportError, QuantizeSettings, export_all
from beni_pipeline.defs.evaluation.assets import EVAL_SET, TRAINED_MODEL, EvalConfig, eval_set_or_fail, model_dir_or_fail
from beni_pipeline.defs.layout import DataLayout

COLUMNS = {
    "name": "string",
    "size_mb": "float",
    "size_ratio": "float",
    "load_s": "float",
    "tokens_per_s": "float",
    "samples_per_s": "float",
    "correct": "int",
    "total": "int",
    "score_delta": "int",
}


class ExportsConfig(EvalConfig):
    schemes: list[str] = pydantic.Field(list(SCHEMES), description=f"quantization schemes, from {list(SCHEMES)}")
    llava: bool = pydantic.Field(
        True, description="also export to transformers' LlavaForConditionalGeneration layout where the model allows"
    )


@dg.asset(group_name="export", deps=[TRAINED_MODEL, EVAL_SET], kinds={"pytorch", "safetensors"}, owners=["team:model"])
def quantized_exports(context: dg.AssetExecutionContext, config: ExportsConfig, layout: DataLayout) -> dg.MaterializeResult:
    """The trained model quantized with each scheme (and in LLaVA's layout), every export loaded back in a fresh
    process and re-scored on the eval set against the unquantized model: size, load time, tokens/s, score delta."""
    unknown = sorted(set(config.schemes) - set(SCHEMES))
    if unknown:
        raise dg.Failure(f"Unknown quantization schemes {unknown}: choose from {list(SCHEMES)}.", allow_retries=False)
    model_dir = model_dir_or_fail(layout)
    out_dir = layout.exports
    eval_json, image_root, _ = eval_set_or_fail(layout)
    settings = QuantizeSettings(tuple(config.schemes), config.llava, config.eval_settings())
    try:
        report = export_all(model_dir, out_dir, eval_json, image_root, settings, config.device or None)
    except ExportError as e:
        raise dg.Failure(str(e), allow_retries=False) from None
    for name, reason in report.skipped.items():
        context.log.warning(f"{name} skipped: {reason}")
    rows = [dg.TableRecord({k: r[k] for k in COLUMNS}) for r in report.rows]
    return dg.MaterializeResult(
        metadata={
            "exports": dg.MetadataValue.table(rows, schema=dg.TableSchema(columns=[dg.TableColumn(k, t) for k, t in COLUMNS.items()])),
            "skipped": dg.MetadataValue.md("\n".join(f"- **{k}**: {v}" for k, v in report.skipped.items()) or "none"),
            "reference_score": f"{report.rows[0]['correct']}/{report.rows[0]['total']}",
            "path": dg.MetadataValue.path(str(out_dir)),
            "serve": dg.MetadataValue.md(
                "\n".join(f"- `beni serve {out_dir / r['name']}`" for r in report.rows if r["name"] != "reference")
            ),
        }
    )
