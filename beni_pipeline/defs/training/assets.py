import base64
import json
import shlex
from pathlib import Path

import dagster as dg
import pydantic
import torch

from beni_model.data import shard_paths
from beni_model.files import atomic_path
from beni_model.recipe import run_recipe
from beni_model.train import torchrun_command
from beni_pipeline.defs.config import Config
from beni_pipeline.defs.layout import DataLayout
from beni_pipeline.defs.training.resources import TrainingRecipe

# The run queue (dagster_home/dagster.yaml) runs one run per beni/gpu value at a time: all local GPUs are one set.
TRAINING_TAGS = {"beni/gpu": "local", "dagster/max_runtime": str(3 * 24 * 3600)}


class TrainedModelConfig(Config):
    processes_per_node: int = pydantic.Field(0, ge=0, description="0: one per GPU, or 2 CPU processes (gloo) without GPUs")
    max_steps: int | None = pydantic.Field(None, ge=1, description="sets every stage's step count")
    batch_size: int | None = pydantic.Field(None, ge=1, description="sets every stage's batch, per process and micro-step")
    grad_accum: int | None = pydantic.Field(None, ge=1, description="sets every stage's micro-steps per optimizer step")
    lr_scale: float = pydantic.Field(1.0, gt=0, description="multiplies every part's peak learning rate in every stage (their ratios stay)")
    save_every: int | None = pydantic.Field(None, ge=1, description="sets every stage's steps between checkpoints")
    peak_tflops: float | None = pydantic.Field(None, ge=0, description="one device's bf16 peak, for MFU")
    augment: list[str] | None = pydantic.Field(
        None, description="sets every stage's augmentation: any of camera, glyphs ([]: none); empty: the recipe's"
    )
    wandb: bool = pydantic.Field(False, description="also log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
    nodes: int = pydantic.Field(
        1,
        ge=1,
        description="machines training together; each other machine runs the command this step logs, the data root at the same path",
    )
    rendezvous: str = pydantic.Field(
        "", description="host:port of the c10d rendezvous every node reaches (e.g. this machine's :29400); nodes > 1"
    )

    @pydantic.model_validator(mode="after")
    def _rendezvous_for_several_nodes(self):
        if self.nodes > 1 and not self.rendezvous:
            raise ValueError(f"nodes is {self.nodes} but rendezvous is empty; give the host:port of one node that every node can reach")
        return self


@dg.asset(
    group_name="training",
    deps=[dg.AssetKey("training_shards")],
    kinds={"pytorch"},
    owners=["team:training"],
    pool="gpu",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainedModelConfig,
    pipes: dg.PipesSubprocessClient,
    layout: DataLayout,
    recipe: TrainingRecipe,
) -> dg.MaterializeResult:
    """The recipe's stages trained one after another by torchrun (FSDP2) on the training shards; logs and step
    metrics stream back through Dagster Pipes. A re-materialization resumes each stage from its last checkpoint
    (a finished stage only re-saves its final model)."""
    plan = recipe.load()  # the resource names the recipe; plan is the loaded, validated file
    processes = config.processes_per_node or torch.cuda.device_count() or 2
    overrides = {
        k: v
        for k, v in config.model_dump().items()
        if v is not None and k in ("max_steps", "batch_size", "grad_accum", "save_every", "augment")
    }
    root = layout.training(plan.name)
    configs = plan.train_configs(layout.shards, root, layout.model_parts, config.lr_scale, **overrides)
    for train_config in configs:
        train_config.wandb, train_config.peak_tflops = config.wandb, config.peak_tflops or 0.0
    results = []

    def launch(config_path: Path, train_config) -> None:
        context.log.info(
            f"stage {Path(train_config.output_dir).name}: {config.nodes} x {processes} processes, {train_config.max_steps} steps, output {train_config.output_dir}"
        )
        command = torchrun_command(
            config_path, processes, config.nodes, config.rendezvous, run_id=f"{plan.name}-{Path(train_config.output_dir).name}"
        )
        if config.nodes > 1:
            context.log.info(f"waiting for {config.nodes - 1} more nodes at {config.rendezvous}; on each, run: {shlex.join(command)}")
        results.append(pipes.run(command=command, context=context).get_materialize_result())

    try:
        shards = shard_paths(layout.shards)
        if len(shards) < processes:  # else every rank fails in its loader, each with a traceback
            raise dg.Failure(
                f"{len(shards)} training shards cannot feed {processes} training processes (each reads its own): re-materialize "
                f"training_shards with a smaller max_samples, or set processes_per_node to {len(shards)}.",
                allow_retries=False,
            )
        out = run_recipe(plan, configs, root, launch)
    except (ValueError, FileNotFoundError) as e:
        raise dg.Failure(str(e), allow_retries=False) from None
    result = results[-1]
    publish(out / "final", layout.final_model)
    summary = json.loads((out / "summary.json").read_text())
    png = (out / "loss.png").read_bytes()
    return dg.MaterializeResult(
        metadata={
            **result.metadata,
            "recipe": plan.name,
            "checkpoint": dg.MetadataValue.path(summary["checkpoint"]),
            "final_model": dg.MetadataValue.path(summary["final_model"]),
            "loss_curve": dg.MetadataValue.md(f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})"),
            "loss_curve_path": dg.MetadataValue.path(summary["loss_curve"]),
            "serve": dg.MetadataValue.md(f"Chat with it (a page at `/`, the OpenAI API at `/v1`): `beni serve {layout.final_model}`"),
        }
    )


def publish(model: Path, link: Path) -> None:
    """Point `link` at the newest final model, switching atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(link, replace=False) as tmp:  # a link replaces a link in one rename
        tmp.symlink_to(model.resolve(), target_is_directory=True)


training_job = dg.define_asset_job(
    "train",
    selection=[trained_model],
    tags=TRAINING_TAGS,
    description="Train the model on the current shards, one run per GPU set at a time.",
)
