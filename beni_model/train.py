"""The beni trainer, one process per device under torchrun:

    torchrun --nproc-per-node 2 -m beni_model.train --config train.json

FSDP2 shards every transformer block of the vision tower and the LLM as its own unit; the root unit holds the
rest (embeddings, the tied lm_head, the connector, norms), so tied weights always share a unit. bf16 compute
with fp32 master weights and reductions on GPU (NCCL), fp32 on CPU (gloo); a single GPU trains the plain
module under bf16 autocast, each block's inputs cast to bf16 as FSDP's policy casts them. Checkpoints (model,
optimizer, scheduler, data position, RNG) are written with torch.distributed.checkpoint into a temp folder that
rank 0 renames once every rank is done, and a new launch resumes from the newest one. Rank 0 logs to
metrics.jsonl, draws loss.png, optionally mirrors to wandb (offline unless WANDB_MODE says otherwise) and, when
started by Dagster Pipes, streams its logs and the final metadata back.
"""

import argparse
import base64
import dataclasses
import json
import math
import os
import resource
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from PIL import Image, ImageDraw
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from beni_model.chat import IGNORE_INDEX, load_tokenizer
from beni_model.config import BeniConfig
from beni_model.data import (
    DataPosition,
    DataSettings,
    make_loader,
    normalization,
    normalize_pixels,
    shard_paths,
    to_device,
)
from beni_model.modeling import BeniForConditionalGeneration, check_image_tokens
from beni_model.vision import conv_stem_flops

PARTS = ("vision_tower", "connector", "language_model")
STAGES = ("encoder", "align", "finetune")
GRAPHED_WIDTH_MULTIPLE = 32  # cuda_graphs pads rows to a multiple of this: each batch shape costs a capture
CHECKPOINT_WRITE_THREADS = 4  # a 2 GB checkpoint: 4.4-5.2 s with one writer thread, 2.3-2.5 s with 4 (2-core VM)
MAX_SKIPPED_IN_A_ROW = 20  # optimizer steps skipped for a non-finite gradient norm before the run stops
PROFILE_AFTER = 10  # profile_steps start after this many steps of a launch: the first ones compile and capture


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
    part_lr: dict[str, float] = field(default_factory=dict)  # a part's own peak lr, e.g. {"vision_tower": 1e-3} for an encoder trained from scratch
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    text_fraction: float = 0.0
    pack: bool = False  # concatenate each micro-batch's samples into rows of up to max_length tokens: fewer rows, less padding
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
        if self.stage == "encoder" and not self.trained_extensions:
            problems.append("the encoder stage trains the vision tower on the extensions' losses: name one in extensions, with a weight above 0")
        if self.trained_extensions and (self.stage == "align" or self.lora_rank or (self.stage == "finetune" and "vision_tower" not in self.train_parts)):
            problems.append("an extension's loss trains the vision tower: use stage 'finetune' with vision_tower in train_parts, no LoRA, or weight 0")
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


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups per part (its lr from part_lr, else lr) and per kind: no weight decay on biases and norms."""
    groups = []
    for part in PARTS:
        params = [p for p in beni_of(model).part_parameters(part) if p.requires_grad]
        lr = config.part_lr.get(part, config.lr)
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": config.weight_decay if decay else 0.0})
    return groups


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(config: TrainConfig, tokenizer) -> nn.Module:
    torch.manual_seed(config.seed)  # every rank starts from the same weights
    if config.init_from:
        model = BeniForConditionalGeneration.from_pretrained(config.init_from)
    else:
        beni_config = BeniConfig(
            vision_model=config.vision_model,
            vision_config=config.vision_config,
            text_model=config.text_model,
            connector=config.connector,
            vision_stem=config.vision_stem,
            image_size=config.image_size,
            extensions=config.model_extensions,
        )
        model = BeniForConditionalGeneration.from_parts(beni_config, tokenizer)
    if missing := set(config.extensions) - set(model.config.extensions):
        raise ValueError(f"This stage names the extensions {sorted(missing)}, which the model in {config.init_from} lacks: add them in its first stage.")
    trained = {"encoder": ("vision_tower",), "align": ("connector",)}.get(config.stage, config.train_parts)
    for part in PARTS:
        for param in model.part_parameters(part):
            param.requires_grad_(part in trained and not config.lora_rank)
    if config.lora_rank:
        from beni_model.adapters import add_lora  # peft (and bitsandbytes) take seconds to import

        return add_lora(model, rank=config.lora_rank, gradient_checkpointing=config.activation_checkpointing)
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def beni_of(model: nn.Module) -> BeniForConditionalGeneration:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of the vision encoder and the LLM: members of a ModuleList whose class the part
    itself names as unsplittable."""
    beni = beni_of(model)
    blocks = []
    for part in (beni.vision_tower.encoder, beni.language_model):
        names = set(getattr(part, "_no_split_modules", None) or [])
        for module in part.modules():
            if isinstance(module, nn.ModuleList):
                blocks += [child for child in module if type(child).__name__ in names]
    return blocks


def shard(model: nn.Module, device: torch.device, world_size: int, compile: bool = False, cuda_graphs: bool = False) -> nn.Module:
    """FSDP2 over the ranks: each transformer block its own unit, the rest (embeddings, tied lm_head,
    connector) the root unit. One process skips FSDP: there is nothing to shard, and its per-block casts and
    copies cost a third of the step on one GPU; the fp32 module then runs under bf16 autocast (train_step), each
    block's floating inputs cast to bf16 as FSDP's policy casts them (`bf16_inputs`).
    `cuda_graphs` makes each compiled block a CUDA graph: the compiled step is bound by the host's kernel launches
    (bench/BENCHMARKS.md), and a graph replays a block's kernels in one launch. It needs one process (FSDP's
    collectives run between the blocks) and costs a capture per new batch shape."""
    if cuda_graphs and world_size > 1:
        raise ValueError(f"cuda_graphs needs one process; this run has {world_size}: leave cuda_graphs off under FSDP.")
    model.to(device)
    blocks = transformer_blocks(model)
    if under_autocast(device, world_size):
        for block in blocks:
            block.register_forward_pre_hook(bf16_inputs, with_kwargs=True)
    if compile:
        for block in blocks:
            block.compile(mode="reduce-overhead" if cuda_graphs else None)
        beni_of(model).vision_tower.compile_stem()
    for extension in beni_of(model).extensions.values():
        extension.to_device(device, compile)
    if world_size == 1:
        return model
    mesh = init_device_mesh(device.type, (world_size,))
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def under_autocast(device: torch.device, world_size: int) -> bool:
    """Whether the step runs the fp32 module under bf16 autocast, its blocks fed bf16 (`bf16_inputs`): on one GPU.
    FSDP casts for itself on several, and the CPU trains in fp32."""
    return device.type == "cuda" and world_size == 1


def bf16_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's floating-point inputs in bf16. Autocast casts only a matmul's inputs, so without this the residual
    stream between the blocks (and the rotary tables) would stay fp32 and double the traffic of every norm, add and
    activation: 5.7% of the small config's GPU time per step on an H200 (bench/BENCHMARKS.md)."""

    def cast(x):
        return x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}


def train_flops(beni_config: BeniConfig, tokens: int, seq_len: int, images: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 forwards, 2 per multiply-add), the PaLM way:
    every weight matmul plus attention scores, for the LLM over all tokens and the encoder over all patches."""
    text, vision = beni_config.text_config, beni_config.vision_config
    d, layers = text.hidden_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", text.num_attention_heads) * head_dim
    llm_params = layers * (d * (d + 2 * kv) + text.num_attention_heads * head_dim * d + 3 * d * text.intermediate_size)
    llm_params += d * text.vocab_size  # lm_head
    llm = 6 * llm_params * tokens + 12 * layers * d * seq_len * tokens
    patches = (beni_config.image_size // beni_config.patch_size) ** 2
    dv = vision.hidden_size
    vision_params = vision.num_hidden_layers * (4 * dv * dv + 2 * dv * vision.intermediate_size)
    vis = images * (6 * vision_params * patches + 12 * vision.num_hidden_layers * dv * patches * patches)
    if beni_config.vision_stem:
        vis += images * 3 * conv_stem_flops(beni_config.patch_size, dv, beni_config.image_size)
    return llm + vis


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plot_loss(points: list[tuple[int, float]], path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """A plain loss-vs-step line chart drawn with PIL (no plotting library needed)."""
    width, height = size
    left, right, top, bottom = 60, 20, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if points:
        steps, losses = zip(*points)
        lo, hi = min(losses), max(losses)
        span_s, span_l = max(1, steps[-1] - steps[0]), max(1e-9, hi - lo)
        xy = [
            (left + (s - steps[0]) / span_s * (width - left - right), top + (hi - v) / span_l * (height - top - bottom)) for s, v in points
        ]
        draw.line(xy if len(xy) > 1 else xy * 2, fill=(31, 119, 180), width=2)
        draw.text((4, top), f"{hi:.3f}", fill="black")
        draw.text((4, height - bottom - 10), f"{lo:.3f}", fill="black")
        draw.text((left, height - bottom + 8), f"step {steps[0]}", fill="black")
        draw.text((width - right - 70, height - bottom + 8), f"step {steps[-1]}", fill="black")
    draw.text((width // 2 - 30, height - 16), "training loss", fill="black")
    image.save(path)


class Checkpoints:
    """step_XXXXXXX/ folders: DCP shards of model + optimizer, trainer.json (step, scheduler) and one
    rank{r}.json per rank (data position, RNG). Written under a dot-prefixed temp name, renamed by rank 0."""

    def __init__(self, root: Path, rank: int, keep: int):
        self.root, self.rank, self.keep = root, rank, keep

    def latest(self) -> Path | None:
        done = sorted(self.root.glob("step_*")) if self.root.is_dir() else []
        return done[-1] if done else None

    def save(self, step: int, model, optimizer, scheduler, position: DataPosition, device: torch.device) -> Path:
        final, tmp = self.root / f"step_{step:07d}", self.root / f".step_{step:07d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, thread_count=CHECKPOINT_WRITE_THREADS))
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        extra = {"position": asdict(position), "rng": {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in rng.items()}}
        (tmp / f"rank{self.rank}.json").write_text(json.dumps(extra))
        if self.rank == 0:
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict()}))
        dist.barrier()
        if self.rank == 0:
            os.replace(tmp, final)
            for old in sorted(self.root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old)
        dist.barrier()
        return final

    def load(self, path: Path, model, optimizer, scheduler, device: torch.device) -> tuple[int, DataPosition]:
        extra_path = path / f"rank{self.rank}.json"
        if not extra_path.is_file():
            raise RuntimeError(f"{path} was written by fewer processes than this run has: resume with the same number of processes.")
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        # Weights that never get a gradient (an encoder's unused pooling head) have no optimizer state saved.
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        trainer = json.loads((path / "trainer.json").read_text())
        scheduler.load_state_dict(trainer["scheduler"])
        extra = json.loads(extra_path.read_text())
        rng = {k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8) for k, v in extra["rng"].items()}
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        return trainer["step"], DataPosition(**extra["position"])


def step_profiler(steps: int, out: Path, cuda: bool) -> torch.profiler.profile:
    """torch.profiler over `steps` training steps after the first PROFILE_AFTER: writes profile.txt (the ops by
    device time and by host time, with the kernel time per step) and profile_trace.json.gz (a timeline for Perfetto);
    `cuda`: the steps run on a GPU, whose kernels it records too."""

    def write(prof: torch.profiler.profile) -> None:
        ops = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in ops if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
        tables = ([ops.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90)] if cuda else [])
        tables.append(ops.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
        header = f"steps {PROFILE_AFTER + 1}-{PROFILE_AFTER + steps} of this launch: {kernels / steps / 1e3:.1f} ms of GPU kernels per step (its wall time: metrics.jsonl)"
        (out / "profile.txt").write_text("\n\n".join([header, *tables]) + "\n")
        prof.export_chrome_trace(str(out / "profile_trace.json.gz"))

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=PROFILE_AFTER - 1, warmup=1, active=steps, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, complete lines only: the one being written, or cut by a kill, is left out."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


class Reporter:
    """Rank 0's outlets: metrics.jsonl (cut back to the resumed step), wandb, Dagster Pipes."""

    def __init__(self, config: TrainConfig, out: Path, start_step: int):
        self.path = out / "metrics.jsonl"
        self.rows = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.pipes = self.wandb = None
        if os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self._pipes_cm = open_dagster_pipes()
            self.pipes = self._pipes_cm.__enter__()
        if config.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project="beni", dir=str(out), config=asdict(config), resume="allow", id=out.name)

    def info(self, message: str) -> None:
        print(message, flush=True)
        if self.pipes:
            self.pipes.log.info(message)

    def step(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        self.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def finish(self, summary: dict) -> None:
        if self.wandb:
            self.wandb.finish()
        if self.pipes:
            self.pipes.report_asset_materialization(metadata={k: v for k, v in summary.items() if v is not None})
            self._pipes_cm.__exit__(None, None, None)


def save_final(model, config: TrainConfig, tokenizer, out: Path, rank: int) -> Path:
    """Gather the full weights on rank 0 and save a plain beni model (LoRA merged) with its tokenizer."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = out / "final"
    if rank == 0:
        with torch.device("meta"):  # the state replaces every weight: no random init (7.5 -> 0.9 s on a 2-core VM)
            plain = BeniForConditionalGeneration(beni_of(model).config)
            if config.lora_rank:
                from beni_model.adapters import add_lora

                plain = add_lora(plain, rank=config.lora_rank)
        plain.load_state_dict(state, assign=True)
        plain.tie_weights()
        if config.lora_rank:
            plain = plain.merge_and_unload()
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # a plain `python -m beni_model.train`: one process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world_size, device


def labeled_loss(model, inputs: dict, labels: torch.Tensor, num_items: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """Summed cross-entropy / num_items, with the LM head run only at the columns that predict some label:
    image and prompt positions (most of a VLM batch) never reach the vocabulary-sized logits. `labels` stay on
    the host, where the loader left them. Also returns the extensions' losses where `inputs` has their targets."""
    device = inputs["input_ids"].device
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # labels still on the host: no device sync
    out = model(**inputs, logits_to_keep=to_device(keep, device), use_cache=False)
    targets = to_device(targets[:, keep], device).flatten()
    loss = (fused_cross_entropy if device.type == "cuda" else cross_entropy)(out.logits.flatten(0, 1), targets)
    return loss / num_items, out.extension_losses


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the targets that are not IGNORE_INDEX, computed in fp32."""
    return nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


# Compiled, on the GPU: one fused pass each way over the bf16 logits instead of an fp32 copy of them, its softmax and
# their gradient in fp32 (the vocabulary is wide: 4.7 of the small config's 90.7 GPU ms per step).
fused_cross_entropy = torch.compile(cross_entropy, dynamic=True)


def samples_in(batch: dict) -> int:
    """Rows of a padded batch; starts of real sequences (position 0 on a real token) in a packed one."""
    if "position_ids" not in batch:
        return len(batch["input_ids"])
    return int(((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum())


@dataclass
class StepStats:
    """A step's numbers, left on the device so the host can queue the next step: `host()` waits for this one."""

    values: torch.Tensor  # LM loss, extensions' loss, grad norm, then the global tokens, samples, images, flops
    extensions_only: bool
    has_extension_loss: bool

    def host(self) -> dict:
        lm_loss, extension_loss, grad_norm, tokens, samples, images, flops = self.values.tolist()
        return {
            "loss": extension_loss if self.extensions_only else lm_loss,
            "extension_loss": extension_loss if self.has_extension_loss else None,
            "grad_norm": grad_norm,
            "skipped": not math.isfinite(grad_norm),
            "tokens": tokens,
            "samples": samples,
            "images": images,
            "flops": flops,
        }


def train_step(
    model,
    micro: list[dict],
    optimizer,
    trainable: list,
    max_grad_norm: float,
    beni_config: BeniConfig,
    device: torch.device,
    weights: dict[str, float] | None = None,
    extensions_only: bool = False,
) -> StepStats:
    """One optimizer step over the micro-batches (gradient sync on the last only); loss is the token mean over
    every rank's label tokens, plus the extensions' losses by their `weights` (the sum's mean over micro-batches and
    ranks) where the batches carry their targets; `extensions_only` (the encoder stage) trains on that sum alone and
    never runs the LLM. The step never waits on the device: `optimizer` is a fused one (AdamW(fused=True)), which
    skips a step whose gradient norm is not finite on the device, on every rank alike (the norm is global), so one
    overflow never turns the weights into NaN. The stats (see StepStats.host): the loss (the LM's; the extensions'
    when `extensions_only`), the extensions' weighted loss (None without targets), grad norm, whether the step was
    skipped and the step's global counts (no text tokens when `extensions_only`)."""
    world_size = dist.get_world_size()
    weights = weights or {}
    target_keys = tuple(k for e in beni_of(model).extensions.values() for k in e.batch_keys) if weights else ()
    for b in micro:
        check_image_tokens(int((b["input_ids"] == beni_config.image_token_id).sum()), len(b.get("pixel_values", ())), beni_config.num_image_tokens())
    counts = torch.tensor(
        [
            sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
            0 if extensions_only else sum(int(b["attention_mask"].sum()) for b in micro),
            sum(samples_in(b) for b in micro),
            sum(len(b.get("pixel_values", ())) for b in micro),
            sum(train_flops(beni_config, 0 if extensions_only else b["input_ids"].numel(), b["input_ids"].shape[1], len(b.get("pixel_values", ()))) for b in micro),
        ],
        dtype=torch.float64,
    )
    counts = to_device(counts, device)
    dist.all_reduce(counts)
    num_items = counts[0].float() / world_size  # FSDP averages the ranks' gradients
    sums = torch.zeros(2, device=device)  # LM loss, extensions' loss: one all-reduce for both
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=under_autocast(device, world_size))
    for i, batch in enumerate(micro):
        if world_size > 1:
            model.set_requires_gradient_sync(i == len(micro) - 1)
        # Packed rows go without attention_mask: transformers then builds the per-sample causal mask from position_ids.
        # Padded rows go without one too: their padding is on the right, after every real token, so causal attention
        # never reads it, and SDPA runs its causal kernel instead of building and applying a padding mask.
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "pixel_values") if k in batch}
        if targets := {k: batch[k].to(device, non_blocking=True) for k in target_keys if k in batch}:
            inputs["extension_targets"] = targets
        if "pixel_values" in inputs:
            inputs["pixel_values"] = normalize_pixels(inputs["pixel_values"], *normalization(beni_config.vision_config.model_type))
        if extensions_only:
            with autocast:
                extra = weighted(model(pixel_values=inputs["pixel_values"], extension_targets=targets).extension_losses, weights)
            (extra / len(micro)).backward()
            sums[1] += extra.detach() / len(micro)
            continue
        with autocast:
            loss, losses = labeled_loss(model, inputs, batch["labels"], num_items)
        if (extra := weighted(losses, weights)) is not None:
            (loss + extra / len(micro)).backward()
            sums[1] += extra.detach() / len(micro)
        else:
            loss.backward()
        sums[0] += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.found_inf = (~grad_norm.isfinite()).float()  # read by a fused optimizer's step, as under a GradScaler
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(sums)
    values = torch.cat([(sums / world_size).double(), grad_norm.double().view(1), counts[1:]])
    return StepStats(values, extensions_only, any(k in b for b in micro for k in target_keys))


def weighted(losses: dict[str, torch.Tensor] | None, weights: dict[str, float]) -> torch.Tensor | None:
    """The sum of the extensions' losses by their weights; None where none has a loss this step."""
    terms = [weights[name] * loss for name, loss in (losses or {}).items() if name in weights]
    return sum(terms[1:], terms[0]) if terms else None


def train(config: TrainConfig) -> dict:
    began = time.perf_counter()
    rank, world_size, device = setup_distributed(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(out / "checkpoints", rank, config.keep_checkpoints)
    if rank == 0:
        for stale in checkpoints.root.glob(".step_*.tmp"):
            shutil.rmtree(stale)
    tokenizer = load_tokenizer(config.init_from or config.text_model)
    model = build_model(config, tokenizer)
    beni_config = beni_of(model).config
    graphs = config.cuda_graphs and world_size == 1  # a recipe's graphs, off where FSDP's collectives run between the blocks
    model = shard(model, device, world_size, config.compile, graphs)
    # Part by part, each extension's weights with the part they follow: the gradient norm sums them in this order.
    trainable = [p for part in PARTS for p in beni_of(model).part_parameters(part) if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr, betas=(0.9, 0.95), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))

    step, position = 0, DataPosition()
    if latest := checkpoints.latest():
        step, position = checkpoints.load(latest, model, optimizer, scheduler, device)
    reporter = Reporter(config, out, step) if rank == 0 else None
    if reporter:
        reporter.info(
            f"{'resuming from ' + latest.name if latest else 'starting'} at step {step} of {config.max_steps} on {world_size} x {device.type}"
            + f" after {time.perf_counter() - began:.1f} s of set-up"
        )
        if config.cuda_graphs and not graphs:
            reporter.info(f"cuda_graphs off: they need one process, and this run has {world_size} (FSDP)")

    settings = DataSettings(
        shards=config.shards,
        batch_size=config.batch_size,
        image_size=beni_config.image_size,
        tokens_per_image=beni_config.num_image_tokens(),
        max_length=config.max_length,
        text_fraction=config.text_fraction,
        pack=config.pack,
        pad_to_multiple_of=GRAPHED_WIDTH_MULTIPLE if graphs else 1,
        extensions=beni_config.extensions,
        targets=tuple(config.trained_extensions),
        grid=beni_config.image_size // beni_config.patch_size,
        seed=config.seed,
    )
    batches = iter(make_loader(settings, tokenizer, rank, world_size, position, config.workers, device.type == "cuda"))
    model.train()
    profiler = step_profiler(config.profile_steps, out, device.type == "cuda") if config.profile_steps and rank == 0 else None
    if profiler:
        profiler.start()
    skipped_in_a_row = 0
    pending = None  # the last step's stats and row, read once the next step is queued: the host never waits for the GPU

    def report(stats: StepStats, row: dict) -> None:
        nonlocal skipped_in_a_row
        stats = stats.host()
        skipped_in_a_row = skipped_in_a_row + 1 if stats["skipped"] else 0
        if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:  # every rank sees the same global norm: all stop together
            raise RuntimeError(
                f"{MAX_SKIPPED_IN_A_ROW} steps in a row up to step {row['step']} had non-finite gradients: lower lr or check the data."
            )
        if reporter:
            seconds = row.pop("seconds")
            reporter.step(
                {
                    "step": row["step"],
                    "loss": stats["loss"],
                    **({"extension_loss": stats["extension_loss"]} if stats["extension_loss"] is not None else {}),
                    "lr": row["lr"],
                    "grad_norm": stats["grad_norm"],
                    "skipped": int(stats["skipped"]),
                    "tokens_per_s": stats["tokens"] / seconds,
                    "samples_per_s": stats["samples"] / seconds,
                    "images": int(stats["images"]),
                    "modality": row["modality"],
                    "mfu": stats["flops"] / seconds / (world_size * config.peak_tflops * 1e12) if config.peak_tflops else None,
                    "peak_memory_gib": peak_memory_gib(device),
                    "seconds": seconds,
                }
            )

    while step < config.max_steps:
        started = time.perf_counter()
        micro = [next(batches) for _ in range(config.grad_accum)]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the graphs may reuse the last step's buffers
        stats = train_step(
            model, micro, optimizer, trainable, config.max_grad_norm, beni_config, device, config.trained_extensions, config.stage == "encoder"
        )
        scheduler.step()
        step += 1
        position = DataPosition(**micro[-1]["position"])
        if pending:
            report(*pending)
        # part_lr parts scale alike; the step's time includes waiting for the step before it: in the steady state, one
        # step of throughput
        pending = stats, {"step": step, "lr": config.lr * lr_factor(step - 1, config), "modality": micro[-1]["modality"],
                          "seconds": time.perf_counter() - started}
        if step % config.save_every == 0 or step == config.max_steps:
            report(*pending)  # a checkpoint's step is in metrics.jsonl before the checkpoint is (a save waits anyway)
            pending = None
            saving = time.perf_counter()
            saved = checkpoints.save(step, model, optimizer, scheduler, position, device)
            if reporter:
                reporter.info(f"checkpoint {saved.name} written in {time.perf_counter() - saving:.1f} s")
        if profiler:
            profiler.step()

    if profiler:
        profiler.stop()
    saving = time.perf_counter()
    final = save_final(model, config, tokenizer, out, rank)
    if reporter:
        reporter.info(f"final model written to {final} in {time.perf_counter() - saving:.1f} s")
    summary = {}
    if reporter:
        rows = reporter.rows
        plot_loss([(r["step"], r["loss"]) for r in rows], out / "loss.png")
        timed = rows[1:] or rows  # the first step pays for warm-up
        extension = [r["extension_loss"] for r in rows if "extension_loss" in r]
        summary = {
            "final_loss": rows[-1]["loss"],
            "final_extension_loss": extension[-1] if extension else None,
            "steps": step,
            "world_size": world_size,
            "device": device.type,
            "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
            "mfu": rows[-1]["mfu"],
            "peak_memory_gib": max(r["peak_memory_gib"] for r in rows),
            "checkpoint": str(checkpoints.latest()),
            "final_model": str(final),
            "loss_curve": str(out / "loss.png"),
            "train_seconds": round(time.perf_counter() - began, 1),  # set-up, steps and saves; not the process start and exit
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        reporter.finish(summary)
    dist.destroy_process_group()
    return summary


def torchrun_command(config_path: str | Path, processes: int) -> list[str]:
    """The command line that trains `config_path` with `processes` ranks on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "beni_model.train",
        "--config",
        str(config_path),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a beni model on WebDataset shards (run under torchrun).")
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    config = TrainConfig.from_json(parser.parse_args().config)
    train(config)


if __name__ == "__main__":
    main()
