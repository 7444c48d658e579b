import base64
import json
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import pydantic
import torch

from beni_model.files import atomic_path
from beni_model.train import torchrun_command
from beni_model.training.config import TrainConfig
from beni_pipeline.defs.config import Config
from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.defs.training.recipes import CPU_RECIPE, RECIPES

# The run queue (dagster_home/dagster.yaml) runs one run per beni/gpu value at a time: all local GPUs are one set.
TRAINING_TAGS = {"beni/gpu": "local", "dagster/max_runtime": str(3 * 24 * 3600)}


class TrainedModelConfig(Config):
    recipe: str = pydantic.Field(
        default_factory=lambda: "smollm2-siglip" if torch.cuda.is_available() else CPU_RECIPE,
        description=f"one of {sorted(RECIPES)}; default smollm2-siglip on a GPU machine, tiny (a minutes-long smoke run) on CPU",
    )
    processes_per_node: int = pydantic.Field(0, ge=0, description="0: one per GPU, or 2 CPU processes (gloo) without GPUs")
    max_steps: int | None = pydantic.Field(None, ge=1, description="overrides every stage's step count")
    batch_size: int | None = pydantic.Field(None, ge=1, description="per process and micro-step")
    grad_accum: int | None = pydantic.Field(None, ge=1, description="micro-steps per optimizer step")
    lr: float | None = pydantic.Field(None, gt=0, description="peak learning rate, overrides every stage's")
    save_every: int | None = pydantic.Field(None, ge=1, description="steps between checkpoints")
    peak_tflops: float | None = pydantic.Field(None, ge=0, description="one device's bf16 peak, for MFU")
    wandb: bool = pydantic.Field(False, description="also log to Weights & Biases (offline unless WANDB_MODE says otherwise)")


@dg.asset(
    group_name="training",
    deps=[dg.AssetKey("training_shards")],
    kinds={"pytorch"},
    owners=["team:training"],
    pool="gpu",
)
def trained_model(
    context: dg.AssetExecutionContext, config: TrainedModelConfig, pipes: dg.PipesSubprocessClient, layout: DataLayout
) -> dg.MaterializeResult:
    """The recipe's stages trained one after another by torchrun (FSDP2) on the training shards; logs and step
    metrics stream back through Dagster Pipes. A re-materialization resumes each stage from its last checkpoint
    (a finished stage only re-saves its final model)."""
    if config.recipe not in RECIPES:
        raise dg.Failure(f"Unknown recipe {config.recipe!r}: pick one of {sorted(RECIPES)}.", allow_retries=False)
    if config.recipe != CPU_RECIPE and not torch.cuda.is_available():
        raise dg.Failure(
            f"Recipe {config.recipe!r} needs a CUDA GPU and none is visible: run it on a GPU machine, or pick recipe {CPU_RECIPE!r} to train on CPU.",
            allow_retries=False,
        )
    processes = config.processes_per_node or torch.cuda.device_count() or 2
    root = layout.training(config.recipe)
    overrides = {k: v for k, v in config.model_dump().items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    previous = None
    for stage in RECIPES[config.recipe](layout.model_parts):
        name = stage.pop("name")
        out = root / name
        train_config = TrainConfig(shards=str(layout.shards), output_dir=str(out), **{**stage, **overrides})
        if previous:
            train_config.init_from = str(previous)
        try:
            train_config.validate()
        except (ValueError, FileNotFoundError) as e:
            raise dg.Failure(str(e), allow_retries=False) from None
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / f"{name}.json"
        config_path.write_text(json.dumps(asdict(train_config), indent=1))
        context.log.info(f"stage {name}: {processes} processes, {train_config.max_steps} steps, output {out}")
        result = pipes.run(command=torchrun_command(config_path, processes), context=context).get_materialize_result()
        previous = out / "final"
    publish(out / "final", layout.final_model)
    summary = json.loads((out / "summary.json").read_text())
    png = (out / "loss.png").read_bytes()
    return dg.MaterializeResult(
        metadata={
            **result.metadata,
            "recipe": config.recipe,
            "checkpoint": dg.MetadataValue.path(summary["checkpoint"]),
            "final_model": dg.MetadataValue.path(summary["final_model"]),
            "loss_curve": dg.MetadataValue.md(f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})"),
            "loss_curve_path": dg.MetadataValue.path(summary["loss_curve"]),
        }
    )


def publish(model: Path, link: Path) -> None:
    """Point `link` at the newest final model, switching atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(link, replace=False) as tmp:  # a link replaces a link in one rename
        tmp.symlink_to(model.resolve(), target_is_directory=True)


training_job = dg.define_asset_job(
    "train", selection=[trained_model], tags=TRAINING_TAGS, description="Train the model on the current shards, one run per GPU set at a time."
)
