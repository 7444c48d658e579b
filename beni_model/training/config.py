"""A stage of a recipe as typed data a user can copy (TrainConfig): its hyperparameters, and the parts of a new model."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from beni_model.data import shard_paths
from beni_model.extensions import extension_class

PARTS = ("vision_tower", "connector", "language_model")
STAGES = ("encoder", "align", "finetune")
GRAPHED_WIDTH_MULTIPLE = 32  # cuda_graphs pads rows to a multiple of this: each batch shape costs a capture


@dataclass
class TrainConfig:
    shards: str  # folder of the training_shards tars and index.json
    output_dir: str  # checkpoints/, final/, metrics.jsonl, loss.png
    text_model: str | None = None  # LLM folder or hub id (with its tokenizer)
    vision_model: str | None = None  # pretrained encoder; None: vision_config trained from scratch
    vision_config: dict | None = None  # e.g. {"model_type": "siglip_vision_model", "image_size": 224, ...}
    init_from: str | None = None  # a saved beni model (an earlier stage's final/) instead of the parts
    connector: str = "mlp2x_gelu"
    vision_stem: str | None = None  # "conv": a conv stem instead of the encoder's patchify (BeniConfig.vision_stem)
    image_size: int | None = None
    images_last: bool = False  # BeniConfig.images_last
    # "encoder": the vision tower alone on the extensions' losses, the LLM not run; "align": the connector alone;
    # "finetune": train_parts, or LoRA when lora_rank > 0
    stage: str = "finetune"
    train_parts: list[str] = field(default_factory=lambda: list(PARTS))
    lora_rank: int = 0
    max_steps: int = 1000
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1
    max_length: int = 2048
    lr: float = 1e-4
    part_lr: dict[str, float] = field(
        default_factory=dict
    )  # a part's own peak lr, e.g. {"vision_tower": 1e-3} for an encoder trained from scratch
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    text_fraction: float = 0.0
    pack: bool = False  # concatenate each micro-batch's samples into rows of up to max_length tokens: fewer rows, less padding
    # What each image read gets anew on the device (data.AUGMENTATIONS): "camera" (colours, light, noise, blur,
    # resolution), "glyphs" (slant, width, wobble, stroke weight)
    augment: list[str] = field(default_factory=list)
    # Extension name -> its settings for a new model (BeniConfig.extensions), plus "weight": its loss's weight in this
    # stage (default 1; 0: the extension runs but its loss does not train). An init_from model keeps its own settings.
    extensions: dict[str, dict] = field(default_factory=dict)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block and a conv stem (GPU)
    cuda_graphs: bool = False  # with compile: each block a CUDA graph per shape (mode "reduce-overhead"), rows padded to a multiple of GRAPHED_WIDTH_MULTIPLE tokens; one process only (off under FSDP, as the log says)
    device: str = "auto"  # auto, cuda or cpu
    workers: int = 2  # DataLoader workers per process
    save_every: int = 200
    keep_checkpoints: int = 2
    peak_tflops: float = 0.0  # bf16 peak of one device, for MFU (0: not reported)
    profile_steps: int = 0  # > 0: rank 0 runs this many steps after the first PROFILE_AFTER under torch.profiler (see step_profiler)
    wandb: bool = False
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"stage {self.stage!r} is not one of {STAGES}")
        if self.stage == "encoder" and self.text_fraction:
            problems.append("the encoder stage learns from images only: set text_fraction to 0")
        if not (self.text_model or self.init_from):
            problems.append("set text_model (an LLM folder or hub id) or init_from (a saved beni model)")
        if not (self.vision_model or self.vision_config or self.init_from):
            problems.append("set vision_model, vision_config or init_from")
        if unknown := set(self.train_parts) - set(PARTS):
            problems.append(f"train_parts {sorted(unknown)} are not among {PARTS}")
        if unknown := set(self.part_lr) - set(PARTS):
            problems.append(f"part_lr names {sorted(unknown)}, which are not among {PARTS}")
        if self.lora_rank and self.stage != "finetune":
            problems.append("LoRA (lora_rank > 0) belongs to the finetune stage")
        if self.profile_steps < 0:
            problems.append("profile_steps must be at least 0")
        if min(self.max_steps, self.batch_size, self.grad_accum, self.save_every) < 1:
            problems.append("max_steps, batch_size, grad_accum and save_every must be at least 1")
        if not 0 <= self.warmup_steps < self.max_steps:
            problems.append(f"warmup_steps {self.warmup_steps} must be below max_steps {self.max_steps}")
        if not 0 <= self.text_fraction <= 1:
            problems.append("text_fraction must lie in [0, 1]")
        if any(self.weight(name) < 0 for name in self.extensions):
            problems.append("an extension's weight must be at least 0")
        for name, settings in self.model_extensions.items():  # here, not after torchrun has started every rank
            try:
                extension_class(name).check(settings, None)
            except ValueError as error:
                problems.append(str(error).rstrip("."))
        if self.stage == "encoder" and not self.trained_extensions:
            problems.append("the encoder stage trains the vision tower on the extensions' losses: name one in extensions, weight above 0")
        tower_frozen = self.stage == "align" or self.lora_rank or (self.stage == "finetune" and "vision_tower" not in self.train_parts)
        if self.trained_extensions and tower_frozen:
            problems.append(
                "an extension's loss trains the vision tower: use stage 'finetune' with vision_tower in train_parts, no LoRA, or weight 0"
            )
        if self.device not in ("auto", "cuda", "cpu"):
            problems.append(f"device {self.device!r} is not auto, cuda or cpu")
        if self.cuda_graphs and not self.compile:
            problems.append("cuda_graphs captures the compiled blocks: set compile too")
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("device='cuda' but no CUDA GPU is visible: run on a GPU machine or set device='cpu'")
        if problems:
            raise ValueError("Bad training config: " + "; ".join(problems) + ".")
        shard_paths(self.shards)

    def weight(self, name: str) -> float:
        return self.extensions[name].get("weight", 1.0)

    @property
    def trained_extensions(self) -> dict[str, float]:
        """The extensions whose losses this stage trains (so the loader builds their targets), with their weights."""
        return {name: self.weight(name) for name in self.extensions if self.weight(name) > 0}

    @property
    def model_extensions(self) -> dict[str, dict]:
        """BeniConfig.extensions of a new model: the settings without the trainer's weight."""
        return {name: {k: v for k, v in settings.items() if k != "weight"} for name, settings in self.extensions.items()}

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        values = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(values) - names:
            raise ValueError(f"Unknown training config keys {sorted(unknown)} in {path}: the keys are {sorted(names)}.")
        config = cls(**values)
        config.validate()
        return config
