"""Metrics and reporting: FLOPs, memory, metrics.jsonl, loss.png, the profiler, wandb and Dagster Pipes."""

import json
import os
import resource
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from beni_model.config import BeniConfig
from beni_model.training.config import TrainConfig
from beni_model.vision import stem_flops

PROFILE_AFTER = 10  # profile_steps start after this many steps of a launch: the first ones compile and capture


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
    vis += images * stem_flops(beni_config)
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


def step_profiler(steps: int, out: Path, cuda: bool) -> torch.profiler.profile:
    """torch.profiler over `steps` training steps after the first PROFILE_AFTER: writes profile.txt (the ops by
    device time and by host time, with the kernel time per step) and profile_trace.json.gz (a timeline for Perfetto);
    `cuda`: the steps run on a GPU, whose kernels it records too."""

    def write(prof: torch.profiler.profile) -> None:
        ops = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in ops if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
        tables = [ops.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90)] if cuda else []
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
        # Under Dagster Pipes the process's stdout reaches the same terminal as the run's log: one of the two, or every
        # line shows twice.
        if self.pipes:
            self.pipes.log.info(message)
        else:
            print(message, flush=True)

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
