"""Checkpoints (DCP shards, data position, RNG) written under a temp name and renamed, and the final model."""

import base64
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from beni_model.data import DataPosition
from beni_model.files import atomic_path
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.training.config import TrainConfig
from beni_model.training.model import beni_of

CHECKPOINT_WRITE_THREADS = 4  # a 2 GB checkpoint: 4.4-5.2 s with one writer thread, 2.3-2.5 s with 4 (2-core VM)


class Checkpoints:
    """step_XXXXXXX/ folders: DCP shards of model + optimizer, trainer.json (step, scheduler) and one
    rank{r}.json per rank (data position, RNG). Every rank writes into one dot-prefixed temp folder, which rank 0
    renames once all are done: a collective write, which `files.atomic_path` (one writer) does not cover."""

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


def save_final(model, config: TrainConfig, processor, out: Path, rank: int) -> Path:
    """Gather the full weights on rank 0 and save a plain beni model (LoRA merged) with its processor (and tokenizer)."""
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
        with atomic_path(final) as tmp:
            plain.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    dist.barrier()
    return final
