import json
from pathlib import Path
from typing import NamedTuple

import dagster as dg
import pydantic

from beni_model.evaluate import (
    FIELDS,
    EvalSettings,
    comparison_line,
    default_device,
    evaluate,
    load_for_eval,
    read_predictions,
    score_line,
    side_by_side,
    side_by_side_markdown,
)
from beni_pipeline.defs.config import Config
from beni_pipeline.defs.data.metadata import thumbnail_md
from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.prep import tesseract
from beni_pipeline.prep.files import write_text_atomic
from beni_pipeline.prep.fonts import corpus_fonts
from beni_pipeline.prep.ocr_eval import EvalSetSettings, corpus_answers, find_overlaps, generate_eval_set, trained_categories
from beni_pipeline.prep.synthetic import corpus_fonts_of
from beni_pipeline.prep.unseen_eval import make_unseen_set

TRAINED_MODEL = dg.AssetKey("trained_model")
CPU_RECIPE = "tiny"  # the CPU demo's recipe (beni_model/recipes/tiny.yaml)
EVAL_SET = dg.AssetKey("heldout_eval_set")
SOURCE_MANIFEST = dg.AssetKey("source_manifest")
UNSEEN = "unseen renderer"  # the unseen-renderer set's column in the side-by-side table
UNSEEN_NO_CAMERA = "unseen renderer, no camera"


class UnseenSet(NamedTuple):
    column: str  # in the side-by-side table
    key: str  # of the metadata
    camera: bool
    folder: Path
    pointer: Path  # {"name", "json", "images"}, when made
    report: Path


def unseen_sets(layout: DataLayout) -> list[UnseenSet]:
    """The unseen-renderer set, photographed and as drawn: the report's gap is to the first; the second tells how much
    of it the photo effects make."""
    return [
        UnseenSet(UNSEEN, "unseen", True, layout.heldout_unseen, layout.unseen_eval_set, layout.ocr_eval_unseen),
        UnseenSet(
            UNSEEN_NO_CAMERA,
            "unseen_no_camera",
            False,
            layout.heldout_unseen_no_camera,
            layout.unseen_no_camera_eval_set,
            layout.ocr_eval_unseen_no_camera,
        ),
    ]


class EvalSetConfig(Config):
    ocrbench_json: str = pydantic.Field("", description="the real OCRBench.json; empty: the held-out generated set")
    ocrbench_images: str = pydantic.Field("", description="the folder OCRBench's image_path entries are relative to")
    per_category: int = pydantic.Field(25, ge=1, description="held-out items per category (OCRBench's 10 and rotated text)")
    seed: int = pydantic.Field(0, description="seed of the held-out set")
    unseen: bool = pydantic.Field(
        True, description="also make the unseen-renderer set (fonts, layouts and camera the corpus never uses) when fonts are fetched"
    )


class EvalConfig(Config):
    batch_size: int | None = pydantic.Field(None, ge=1, description="items per generate call; empty: 256 on a GPU, 16 on a CPU")
    max_new_tokens: int = pydantic.Field(32, ge=1)
    device: str = pydantic.Field("", description="cuda, cpu, ...; empty: cuda when there is one")
    tesseract: bool = pydantic.Field(
        False, description="score Tesseract here on sets it has no scores for (needs tesseract-ocr; a few tenths of a second an image)"
    )

    def eval_settings(self) -> EvalSettings:
        # On the H100 decode throughput still rises from batch 64 to 256 and beyond (bench/BENCHMARKS.md).
        on_gpu = (self.device or default_device()).startswith("cuda")
        return EvalSettings(batch_size=self.batch_size or (256 if on_gpu else 16), max_new_tokens=self.max_new_tokens)


def trained_by(instance: dg.DagsterInstance) -> str | None:
    """The recipe of the latest trained_model materialization, when there is one."""
    event = instance.get_latest_materialization_event(TRAINED_MODEL)
    recipe = event.asset_materialization.metadata.get("recipe") if event and event.asset_materialization else None
    return recipe.value if recipe else None


def categories_trained_on(instance: dg.DagsterInstance, layout: DataLayout) -> set[str] | None:
    """The eval categories the generated corpus teaches, when the latest manifest was built from it alone; None when
    the training data is the user's own (its categories are unknown)."""
    event = instance.get_latest_materialization_event(SOURCE_MANIFEST)
    sources = event.asset_materialization.metadata.get("sources") if event and event.asset_materialization else None
    if sources is None or sources.value != [str(layout.corpus_jsonl)] or not layout.corpus_jsonl.is_file():
        return None
    return trained_categories(layout.corpus_jsonl)


def model_dir_or_fail(layout: DataLayout) -> Path:
    model_dir = layout.final_model
    if not (model_dir / "config.json").is_file():
        raise dg.Failure(f"No trained model at {model_dir}: materialize trained_model first.", allow_retries=False)
    return model_dir


@dg.asset(group_name="evaluation", deps=[dg.AssetKey("source_manifest")], kinds={"json"}, owners=["team:model"])
def heldout_eval_set(context: dg.AssetExecutionContext, config: EvalSetConfig, layout: DataLayout) -> dg.MaterializeResult:
    """The OCRBench-format set every model is scored on: the real OCRBench when configured, else a set generated
    with held-out seeds and vocabulary and checked to share no image or answer with the generated training corpus.
    Made once; the eval report and the exports read it. Beside it, when fonts are fetched, the unseen-renderer set
    (prep/unseen_eval.py): unseen font packages, layouts, backgrounds, colours and camera; and its items again as
    drawn, before the camera."""
    corpus = layout.corpus_jsonl
    if config.ocrbench_json or config.ocrbench_images:
        if not (config.ocrbench_json and config.ocrbench_images):
            raise dg.Failure(
                "Set both ocrbench_json and ocrbench_images to evaluate on the real OCRBench (or neither for the held-out set).",
                allow_retries=False,
            )
        eval_set = {"name": "OCRBench", "json": config.ocrbench_json, "images": config.ocrbench_images}
    else:
        # The corpus's own fonts, when it was drawn: an ablation may have drawn it with the machine's.
        fonts = corpus_fonts_of(layout.corpus)
        settings = EvalSetSettings(config.per_category, config.seed, corpus_fonts(layout.fonts) if fonts is None else fonts)
        eval_json = generate_eval_set(layout.heldout, settings, corpus_answers(corpus) if corpus.is_file() else set())
        check_against_corpus(context, eval_json, layout.heldout, corpus)
        eval_set = {"name": "held-out set", "json": str(eval_json), "images": str(layout.heldout)}
    write_text_atomic(layout.eval_set, json.dumps(eval_set, indent=1))
    items = json.loads(Path(eval_set["json"]).read_text())
    metadata = {
        "eval_set": eval_set["name"],
        "items": len(items),
        "categories": len({i["type"] for i in items}),
        "path": dg.MetadataValue.path(eval_set["json"]),
    }
    for unseen in unseen_sets(layout):
        unseen.pointer.unlink(missing_ok=True)
    settings = EvalSetSettings(config.per_category, config.seed)
    answers = corpus_answers(corpus) if corpus.is_file() and config.unseen else set()
    made = []
    for unseen in unseen_sets(layout) if config.unseen else []:
        if not (unseen_json := make_unseen_set(unseen.folder, layout.fonts, settings, answers, unseen.camera)):
            break  # no fetched fonts
        check_against_corpus(context, unseen_json, unseen.folder, corpus)
        pointer = {"name": f"{unseen.column} set", "json": str(unseen_json), "images": str(unseen.folder)}
        write_text_atomic(unseen.pointer, json.dumps(pointer))
        metadata[f"{unseen.key}_items"] = len(json.loads(unseen_json.read_text()))
        metadata[f"{unseen.key}_path"] = dg.MetadataValue.path(str(unseen_json))
        made.append(unseen)
    if not made:
        why = (
            "unseen: false in the config"
            if not config.unseen
            else f"no fetched fonts at {layout.fonts} (python -m beni_pipeline.prep.fonts fetch {layout.fonts})"
        )
        context.log.info(f"no unseen-renderer set: {why}")  # a machine without fetched fonts: expected, not a fault
        metadata["unseen_set"] = f"not made: {why}"
    return dg.MaterializeResult(metadata=metadata)


def check_against_corpus(context: dg.AssetExecutionContext, eval_json: Path, image_root: Path, corpus: Path) -> None:
    """Fails when a generated set shares an image or an answer with the generated training corpus."""
    if not corpus.is_file():
        context.log.warning(f"no generated corpus at {corpus} to check {eval_json} against")
        return
    overlaps = find_overlaps(eval_json, image_root, corpus)
    if overlaps:
        raise dg.Failure(
            f"The set {eval_json} overlaps the training corpus in {len(overlaps)} items (first: {overlaps[0]}): change its seed.",
            allow_retries=False,
        )
    context.log.info(f"{eval_json} checked against {corpus}: no shared image or answer")


def eval_set_or_fail(layout: DataLayout) -> tuple[Path, Path, str]:
    """(json, image root, name) of the set `heldout_eval_set` made."""
    if not layout.eval_set.is_file():
        raise dg.Failure(f"No eval set at {layout.eval_set}: materialize heldout_eval_set first.", allow_retries=False)
    eval_set = json.loads(layout.eval_set.read_text())
    return Path(eval_set["json"]), Path(eval_set["images"]), eval_set["name"]


def examples_md(records: list[dict], image_root: Path, correct: bool, n: int = 4) -> str:
    chosen = [r for r in records if r["correct"] == correct][:n]
    if not chosen:
        return "none"
    lines = ["| image | type | question | answers | prediction |", "|---|---|---|---|---|"]
    for r in chosen:
        cells = [r["type"], r["question"], json.dumps(r["answers"], ensure_ascii=False), r["prediction"] or "(empty)"]
        thumbnail = thumbnail_md((image_root / r["image_path"]).read_bytes())
        lines.append(f"| {thumbnail} | " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:100] for c in cells) + " |")
    return "\n".join(lines)


def category_table(summary: dict) -> dg.TableMetadataValue:
    columns = {"correct": "int", "total": "int", "accuracy": "float", "similarity": "float"}
    if "head_accuracy" in summary:  # an extension head's own answers (the ocr reading head's transcripts), scored alike
        columns["head_accuracy"] = "float"
    if "trained_on" in summary:  # whether the training data has samples of the category at all
        columns["trained_on"] = "bool"
    return dg.MetadataValue.table(
        [dg.TableRecord({"type": k, **{c: v[c] for c in columns}}) for k, v in summary["by_type"].items()],
        schema=dg.TableSchema(columns=[dg.TableColumn("type", "string"), *(dg.TableColumn(c, t) for c, t in columns.items())]),
    )


@dg.asset(group_name="evaluation", deps=[TRAINED_MODEL, EVAL_SET], kinds={"pytorch"}, owners=["team:model"])
def ocr_eval_report(context: dg.AssetExecutionContext, config: EvalConfig, layout: DataLayout) -> dg.MaterializeResult:
    """The trained model scored with OCRBench's rule on `heldout_eval_set` (the real OCRBench when configured, else
    the held-out generated set): predictions.jsonl, summary.json and report.md in the data root's ocr_eval/report."""
    model_dir = model_dir_or_fail(layout)
    eval_json, image_root, set_name = eval_set_or_fail(layout)
    title = f"OCR eval of {model_dir} on the {set_name}"
    if cpu_run := trained_by(context.instance) == CPU_RECIPE:
        title += f" ({CPU_RECIPE!r} recipe, minutes on a CPU: only the categories its corpus trains on can score)"
    trained = categories_trained_on(context.instance, layout)
    model, tokenizer = load_for_eval(model_dir, config.device or None)
    result = evaluate(model, tokenizer, eval_json, image_root, layout.ocr_eval, config.eval_settings(), title=title, trained=trained)
    summary, records = result.summary, read_predictions(result.predictions)
    context.log.info(f"score {score_line(summary)}")
    metadata = {
        "title": title,
        "score": score_line(summary),
        "correct": summary["correct"],
        "total": summary["total"],
        "accuracy": summary["accuracy"],
        "similarity": summary["similarity"],
        "eval_set": set_name,
        "by_category": category_table(summary),
        "right_answers": dg.MetadataValue.md(examples_md(records, image_root, True)),
        "wrong_answers": dg.MetadataValue.md(examples_md(records, image_root, False)),
        "samples_per_s": summary["samples_per_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "report": dg.MetadataValue.path(str(result.report)),
        "predictions": dg.MetadataValue.path(str(result.predictions)),
    }
    for key in ("ocrbench_score", "head_accuracy"):
        if key in summary:
            metadata[key] = summary[key]
    sets, columns = {set_name: (eval_json, image_root)}, {set_name: summary}
    for unseen in unseen_sets(layout):
        if not unseen.pointer.is_file():
            continue
        made = json.loads(unseen.pointer.read_text())
        unseen_json, unseen_root = Path(made["json"]), Path(made["images"])
        scores = evaluate(
            model, tokenizer, unseen_json, unseen_root, unseen.report, config.eval_settings(), f"{title} ({unseen.column})", trained=trained
        ).summary
        context.log.info(f"{unseen.column} set: {score_line(scores)}")
        sets[unseen.column] = unseen_json, unseen_root
        columns[unseen.column] = scores
        metadata.update({f"{unseen.key}_score": score_line(scores), f"{unseen.key}_accuracy": scores["accuracy"]})
    baseline, note = tesseract.summaries(sets, layout.tesseract_scores, score_missing=config.tesseract)
    columns.update({f"tesseract, {name}": s for name, s in baseline.items()})
    rows = side_by_side(columns)
    layout.comparison.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.comparison / "comparison.json", json.dumps({"rows": rows, "tesseract": note}, indent=1) + "\n")
    write_text_atomic(layout.comparison / "comparison.md", side_by_side_markdown(rows) + f"\nTesseract: {note}\n")
    metadata.update(comparison=comparison_line(rows), side_by_side=dg.MetadataValue.md(side_by_side_markdown(rows)), tesseract=note)
    if rows[-1]["gap"] is not None:
        metadata["gap_points"] = rows[-1]["gap"]
    if "trained_on" in summary:
        metadata["trained_on_accuracy"] = summary["trained_on"]["accuracy"]
        metadata["categories_trained_on"] = len(summary["trained_on"]["categories"])
    if cpu_run:
        context.log.warning(
            f"the model was trained by the {CPU_RECIPE!r} recipe on CPU: only the categories its corpus trains on can score"
        )
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=ocr_eval_report, description="The report has exactly one scored prediction for every item of the eval set, in its order."
)
def report_covers_every_sample(layout: DataLayout) -> dg.AssetCheckResult:
    report = layout.ocr_eval
    summary = json.loads((report / "summary.json").read_text())

    def key(item: dict) -> tuple:  # OCRBench's ids repeat across its source datasets
        return item["dataset_name"], item["id"], item["image_path"], item["question"]

    expected = [key(item) for item in json.loads(Path(summary["eval_set"]).read_text())]
    records = read_predictions(report / "predictions.jsonl")
    incomplete = [r for r in records if any(f not in r for f in (*FIELDS, "prediction", "correct", "similarity"))]
    got = [key(r) for r in records if r not in incomplete]
    return dg.AssetCheckResult(
        passed=got == expected and not incomplete and summary["total"] == len(expected),
        metadata={
            "eval_items": len(expected),
            "predictions": len(records),
            "missing": len(set(expected) - set(got)),
            "unexpected": len(set(got) - set(expected)),
            "incomplete": len(incomplete),
        },
    )
