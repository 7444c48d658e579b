"""Recipes: a model's architecture and its training stages' hyperparameters, as typed data a user can copy and edit.

A recipe is a YAML file (the built-in ones are in `beni_model/recipes/`): `model` names the parts of a new model
(BeniConfig's fields), `stages` the stages that train it one after another, each starting from the final model of
the one before. `run_recipe` runs the stages; the `trained_model` asset and the benchmarks call it.

    model:
      text_model: smollm2-135m-instruct      # a folder, a hub id, or one of OFFLINE_MODELS
      vision_config: {model_type: siglip_vision_model, image_size: 384, patch_size: 16, ...}
    stages:
      - name: finetune
        max_steps: 1000
        lr: {connector: 1.0e-3, language_model: 5.0e-5}   # the parts it trains, each with its peak learning rate
"""

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import pydantic
import torch
import yaml

from beni_model.config import BeniConfig
from beni_model.data import AUGMENTATIONS
from beni_model.files import atomic_path
from beni_model.training.config import TrainConfig

RECIPES_DIR = Path(__file__).parent / "recipes"
Part = Literal["vision_tower", "connector", "language_model"]


def default_recipe() -> str:
    """The recipe a machine trains unless told otherwise: the GPU recipe where there is a GPU, else the CPU demo's."""
    return "smollm2-siglip" if torch.cuda.is_available() else "tiny"


class ModelSpec(pydantic.BaseModel):
    """The parts of a new model: BeniConfig's fields (architecture, no hyperparameters)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    text_model: str = pydantic.Field(description="the LLM: a folder, a hub id, or one of OFFLINE_MODELS")
    vision_model: str | None = pydantic.Field(None, description="a pretrained encoder (folder or hub id); none: vision_config from scratch")
    vision_config: dict | None = None
    connector: str = "mlp2x_gelu"
    vision_stem: str | None = pydantic.Field(None, description="conv, or an extension's stem such as ocr.pplcnet (BeniConfig.vision_stem)")
    image_size: int | None = None
    images_last: bool = pydantic.Field(False, description="a user turn's images after its text, wherever the prompt puts them")
    extensions: dict[str, dict] = pydantic.Field({}, description="extension name -> its settings, e.g. {ocr: {tokens: true}}")

    @pydantic.model_validator(mode="after")
    def _one_vision_source(self):
        if not (self.vision_model or self.vision_config):
            raise ValueError("set vision_model (a pretrained encoder) or vision_config (one trained from scratch)")
        return self


class StageSpec(pydantic.BaseModel):
    """One training stage's hyperparameters. The parts it trains are the keys of `lr`, each with its peak rate."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str
    kind: Literal["encoder", "align", "finetune"] = pydantic.Field(
        "finetune", description="encoder: the vision tower alone on the extensions' losses, the LLM not run; align: the connector alone"
    )
    lr: dict[Part, float] = pydantic.Field(description="peak learning rate of each part this stage trains")
    loss_weights: dict[str, float] = pydantic.Field({}, description="extension name -> its loss's weight in this stage (default 1)")
    max_steps: int = pydantic.Field(ge=1)
    warmup_steps: int = pydantic.Field(50, ge=0)
    min_lr_ratio: float = pydantic.Field(0.1, ge=0, le=1)
    batch_size: int = pydantic.Field(8, ge=1)
    grad_accum: int = pydantic.Field(1, ge=1)
    max_length: int = pydantic.Field(2048, ge=1)
    weight_decay: float = pydantic.Field(0.0, ge=0)
    max_grad_norm: float = pydantic.Field(1.0, gt=0)
    text_fraction: float = pydantic.Field(0.0, ge=0, le=1)
    pack: bool = False
    augment: list[Literal[AUGMENTATIONS]] = pydantic.Field(
        [],
        description="drawn anew for every image read, on the device: camera (colours, light, noise, blur, resolution), "
        "glyphs (slant, width, wobble, stroke weight); true: both, false: none",
    )
    lora_rank: int = pydantic.Field(0, ge=0)
    activation_checkpointing: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    workers: int = pydantic.Field(2, ge=0)
    save_every: int = pydantic.Field(200, ge=1)
    keep_checkpoints: int = pydantic.Field(2, ge=1)
    profile_steps: int = pydantic.Field(0, ge=0)
    seed: int = 0

    @pydantic.field_validator("augment", mode="before")
    @classmethod
    def _augment_on_or_off(cls, value):
        return (list(AUGMENTATIONS) if value else []) if isinstance(value, bool) else value

    @pydantic.model_validator(mode="after")
    def _lr_names_what_it_trains(self):
        trains = {"encoder": {"vision_tower"}, "align": {"connector"}}.get(self.kind)
        if not self.lr:
            raise ValueError(
                f"stage {self.name!r}: lr names no part; give the peak rate of each part it trains, e.g. {{connector: 1.0e-3}}"
            )
        if trains and set(self.lr) != trains:
            raise ValueError(f"stage {self.name!r} of kind {self.kind} trains {sorted(trains)} alone: its lr must name exactly that")
        return self


class Recipe(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str
    description: str = ""
    needs_gpu: bool = False
    model: ModelSpec
    stages: list[StageSpec] = pydantic.Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _unique_stage_names(self):
        names = [s.name for s in self.stages]
        if len(names) != len(set(names)):
            raise ValueError(f"stage names repeat: {names}")
        return self

    def model_config_for(self, parts_dir: Path) -> BeniConfig:
        """The BeniConfig of the recipe's new model (its LLM built offline first where the recipe names one)."""
        spec = self.model.model_dump()
        spec["text_model"] = str(resolve_model(spec["text_model"], parts_dir))
        return BeniConfig(**spec)

    def train_configs(self, shards: Path, out_root: Path, parts_dir: Path, lr_scale: float = 1.0, **overrides) -> list[TrainConfig]:
        """One TrainConfig per stage (the trainer's launch format), each stage after the first starting from the final
        model of the one before. `lr_scale` multiplies every part's rate in every stage; `overrides` set any stage
        hyperparameter (e.g. max_steps) in every stage."""
        configs, previous = [], None
        for stage in self.stages:
            values = StageSpec(**{**stage.model_dump(), **overrides}).model_dump()  # overrides validated as the file is
            lr = {part: rate * lr_scale for part, rate in values.pop("lr").items()}
            weights = values.pop("loss_weights")
            name, kind = values.pop("name"), values.pop("kind")
            config = TrainConfig(
                shards=str(shards),
                output_dir=str(out_root / name),
                stage=kind,
                train_parts=list(lr),
                lr=max(lr.values()),  # unused: every trained part has its own rate in part_lr
                part_lr=lr,
                extensions={ext: {**settings, "weight": weights.get(ext, 1.0)} for ext, settings in self.model.extensions.items()},
                **values,
            )
            if previous:
                config.init_from = str(previous)
            else:
                config.text_model = str(resolve_model(self.model.text_model, parts_dir))
                config.vision_model, config.vision_config = self.model.vision_model, self.model.vision_config
                config.connector, config.vision_stem, config.image_size, config.images_last = (
                    self.model.connector,
                    self.model.vision_stem,
                    self.model.image_size,
                    self.model.images_last,
                )
            configs.append(config)
            previous = out_root / name / "final"
        return configs


class RecipeError(ValueError):
    """A recipe cannot be read; the message says which and how to fix it."""


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe file of the user's."""
    path = Path(name_or_path).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise RecipeError(f"Unknown recipe {name_or_path!r}: pick one of {builtin_recipes()} or give the path of a recipe .yaml file.")
    try:
        return Recipe.model_validate(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML ({e}); fix the file.") from None
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise RecipeError(f"Recipe {path} is invalid: {problems}.") from None


def resolve_model(name: str, parts_dir: Path) -> Path | str:
    """A folder for one of OFFLINE_MODELS (built on this machine, no hub), else `name` as given."""
    build = OFFLINE_MODELS.get(name)
    return build(parts_dir) if build else name


def run_recipe(recipe: Recipe, configs: list[TrainConfig], config_dir: Path, launch: Callable[[Path, TrainConfig], None]) -> Path:
    """Validate every stage before the first starts, then launch each (`launch(config_path, config)` runs the trainer
    on it, e.g. under torchrun) and return the last stage's folder. A stage that already finished only re-saves its
    final model, so running a recipe again resumes it."""
    for config in configs:
        config.validate()
    config_dir.mkdir(parents=True, exist_ok=True)
    for stage, config in zip(recipe.stages, configs):
        with atomic_path(config_dir / f"{stage.name}.json") as tmp:
            tmp.write_text(json.dumps(asdict(config), indent=1))
        launch(config_dir / f"{stage.name}.json", config)
    return Path(configs[-1].output_dir)


def _tiny_llm(parts_dir: Path) -> Path:
    from beni_model.tiny import tiny_llm

    return tiny_llm(parts_dir / "tiny-llama")


def _smollm2(parts_dir: Path) -> Path:
    from beni_model.smollm2 import smollm2_instruct

    return smollm2_instruct()


# LLMs a recipe can name without the hub: each built (or converted) on this machine once, then cached.
OFFLINE_MODELS: dict[str, Callable[[Path], Path]] = {"tiny-llama": _tiny_llm, "smollm2-135m-instruct": _smollm2}
