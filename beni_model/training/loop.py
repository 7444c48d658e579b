"""The training loop of one stage: set-up, resume, steps, checkpoints, the final model and its summary."""

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from beni_model.chat import load_tokenizer
from beni_model.data import DataPosition, DataSettings, DevicePixels, make_loader
from beni_model.processing import BeniProcessor, load_processor
from beni_model.training.checkpoint import Checkpoints, save_final
from beni_model.training.config import GRAPHED_WIDTH_MULTIPLE, PARTS, TrainConfig
from beni_model.training.metrics import Reporter, peak_memory_gib, plot_loss, step_profiler
from beni_model.training.model import beni_of, build_model
from beni_model.training.optim import lr_factor, param_groups
from beni_model.training.parallel import reporting_rank, setup_distributed, shard
from beni_model.training.step import StepStats, train_step

MAX_SKIPPED_IN_A_ROW = 20  # optimizer steps skipped for a non-finite gradient norm before the run stops


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
    # A later stage keeps the processor its first stage made from the encoder (the saved config names no local folder).
    processor = load_processor(config.init_from, beni_config) if config.init_from else BeniProcessor.for_model(beni_config, tokenizer)
    graphs = config.cuda_graphs and world_size == 1  # a recipe's graphs, off where FSDP's collectives run between the blocks
    model = shard(model, device, world_size, config.compile, graphs)
    # Part by part, each extension's weights with the part they follow: the gradient norm sums them in this order.
    trainable = [p for part in PARTS for p in beni_of(model).part_parameters(part) if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr, betas=(0.9, 0.95), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))

    step, position = 0, DataPosition()
    if latest := checkpoints.latest():
        step, position = checkpoints.load(latest, model, optimizer, scheduler, device)
    reporter = Reporter(config, out, step) if rank == reporting_rank(rank, device) else None
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
        # The encoder stage never runs the LLM, so its conversations are never cut (nor refused for their length).
        max_length=None if config.stage == "encoder" and not config.pack else config.max_length,
        text_fraction=config.text_fraction,
        pack=config.pack,
        pad_to_multiple_of=GRAPHED_WIDTH_MULTIPLE if graphs else 1,
        extensions=beni_config.extensions,
        targets=tuple(config.trained_extensions),
        grid=beni_config.image_size // beni_config.patch_size,
        seed=config.seed,
    )
    pixels = DevicePixels(processor.image_processor, device, config.augment, config.seed)
    batches = iter(make_loader(settings, processor, rank, world_size, position, config.workers, device.type == "cuda"))
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
            model,
            micro,
            optimizer,
            trainable,
            config.max_grad_norm,
            beni_config,
            device,
            pixels,
            config.trained_extensions,
            extensions_only=config.stage == "encoder",
        )
        scheduler.step()
        step += 1
        position = DataPosition(**micro[-1]["position"])
        if pending:
            report(*pending)
        # part_lr parts scale alike; the step's time includes waiting for the step before it: in the steady state, one
        # step of throughput
        pending = (
            stats,
            {
                "step": step,
                "lr": config.lr * lr_factor(step - 1, config),
                "modality": micro[-1]["modality"],
                "seconds": time.perf_counter() - started,
            },
        )
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
    final = save_final(model, config, processor, out, rank)
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
