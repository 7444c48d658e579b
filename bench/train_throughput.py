"""Training throughput on one GPU: beni's trainer step against transformers' LlavaForConditionalGeneration; and
FSDP's scaling over the GPUs of one host.

    PYTHONUNBUFFERED=1 python bench/train_throughput.py --configs small base --out train_throughput.json
    PYTHONUNBUFFERED=1 python bench/train_throughput.py --configs small base --variants beni-compile --processes 1 2

With `--processes` each count runs under torchrun (FSDP2 over the ranks, each rank its own batch of the config's
size; the peer and CUDA graphs are one-GPU only) and the scaling efficiency is samples/s at n against n times one.

Random init from real config classes, full fine-tune, synthetic batches of the same shapes for every variant
(image tokens first, then text; labels on the second half of the text, as an assistant reply):
- peer: Llava, bf16 weights, fused AdamW, SDPA, a plain loop (logits at every position);
- beni-full-logits: beni's model and optimizer (fp32 master weights, bf16 autocast and bf16 block inputs on one GPU,
  fused AdamW, clipping) with the loss over logits at every position, as the peer computes it;
- beni: the trainer's step as it runs (train_step: LM head only at label positions, the loss compiled);
- beni-compile: the same with every transformer block torch.compiled;
- beni-cudagraphs: the trainer's `cuda_graphs` (every compiled block a CUDA graph): the compiled step is host-bound;
- beni-reading-loss: beni-compile plus the ocr extension's CTC loss (weight 1) on a transcript of 4-12
  characters per image; beni-reading: that plus the head's transcript as LLM tokens (the extension's `tokens`, 2 per
  patch column), as the smollm2-siglip recipe trains. Their MFU counts the longer sequence but not the head.
Configs: small and base (issue 5's), recipe (the smollm2-siglip recipe's shapes; beni variants only).
MFU counts beni_model.training.metrics.train_flops against a bf16 matmul peak measured in the same run. `--profile` adds each
variant's GPU-busy share (kernel time / wall time of a step) and its busiest kernels. Needs torch and
transformers (+ webdataset, which beni_model.data imports); no Dagster.
"""

import argparse
import gc
import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from beni_model.chat import IGNORE_INDEX
from beni_model.config import BeniConfig
from beni_model.data import DevicePixels
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.ocr.heads import reading_targets
from beni_model.processing import image_processor_for
from beni_model.recipe import load_recipe
from beni_model.training.config import TrainConfig
from beni_model.training.metrics import train_flops
from beni_model.training.parallel import setup_distributed, shard
from beni_model.training.step import train_step

VOCAB = 49152
CONFIGS = {
    # SigLIP-B/16-224 + SmolLM2-135M shape
    "small": {
        "vision": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        "text": {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": VOCAB,
            "tie_word_embeddings": True,
            "max_position_embeddings": 8192,
            "rope_theta": 100000.0,
        },
        "batch": 64,
        "text_len": 256,
    },
    # SigLIP-so400m/14-384 + SmolLM2-1.7B shape (378 px: the same 27x27 patches; beni wants size % patch == 0)
    "base": {
        "vision": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 378,
            "patch_size": 14,
        },
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 24,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": VOCAB,
            "tie_word_embeddings": True,
            "max_position_embeddings": 8192,
            "rope_theta": 130000.0,
        },
        "batch": 8,
        "text_len": 512,
    },
    # the smollm2-siglip recipe's shapes (beni_model/recipes/smollm2-siglip.yaml): its ViT of 8 x 512 at 384 px with
    # a conv stem, pixel shuffle to 144 tokens, SmolLM2-135M, ~40 text tokens per sample; no peer (Llava has neither)
    "recipe": {
        "vision": {k: v for k, v in load_recipe("smollm2-siglip").model.vision_config.items() if k != "model_type"},
        "connector": "pixelshuffle2_mlp2x_gelu",
        "vision_stem": "conv",
        "batch": 64,
        "text_len": 40,
    },
}
CONFIGS["recipe"]["text"] = CONFIGS["small"]["text"]
IMAGE_TOKEN = VOCAB - 1


def matmul_peak_tflops(n: int = 8192, repeats: int = 20) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def beni_config(spec: dict, variant: str) -> BeniConfig:
    reading = variant.startswith("beni-reading")
    return BeniConfig(
        vision_config={"model_type": "siglip_vision_model", **spec["vision"]},
        text_config={"model_type": "llama", **spec["text"]},
        connector=spec.get("connector", "mlp2x_gelu"),
        vision_stem=spec.get("vision_stem"),
        image_token_id=IMAGE_TOKEN,
        extensions={"ocr": {"tokens": variant == "beni-reading", "token_ids": list(range(96)) if variant == "beni-reading" else None}}
        if reading
        else {},
    )


def synthetic_batch(spec: dict, image_tokens: int, transcripts: bool = False) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch, text_len = spec["batch"], spec["text_len"]
    text = torch.randint(0, VOCAB - 1, (batch, text_len), generator=generator)
    input_ids = torch.cat([torch.full((batch, image_tokens), IMAGE_TOKEN), text], dim=1)
    labels = input_ids.clone()
    labels[:, : image_tokens + text_len // 2] = IGNORE_INDEX
    size = spec["vision"]["image_size"]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8),  # as the loader's
    }
    if transcripts:
        rng = random.Random(0)
        lines = ["".join(rng.choices(string.ascii_letters, k=rng.randint(4, 12))) for _ in range(len(text))]
        batch["reading_targets"], batch["reading_lengths"] = reading_targets(lines)
    return {k: v.pin_memory() for k, v in batch.items()}  # as beni's DataLoader (pin_memory) hands batches over


def timed(step, warmup: int, steps: int, profile: bool = False) -> tuple[float, float | None]:
    """Seconds per step and, with `profile`, the share of a step's wall time the GPU spends in kernels (three
    more steps under torch.profiler, whose busiest kernels are printed): below 1, the host is the bound."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    if not profile:
        return seconds, None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70), flush=True)
    return seconds, sum(e.self_device_time_total for e in kernels) / 3 / 1e6 / seconds


def run_peer(spec: dict, batch: dict, warmup: int, steps: int, profile: bool) -> tuple[float, float | None]:
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**spec["vision"]).to_dict(),
        text_config=LlamaConfig(**spec["text"]).to_dict(),
        image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    inputs = {k: v.cuda() for k, v in batch.items()}
    inputs["pixel_values"] = (inputs["pixel_values"] / 127.5 - 1).bfloat16()

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, warmup, steps, profile)


def run_beni(
    spec: dict, batch: dict, warmup: int, steps: int, variant: str, checkpointing: bool, profile: bool
) -> tuple[float, float | None]:
    config = beni_config(spec, variant)
    compile, cudagraphs, full_logits = (
        variant not in ("beni", "beni-full-logits"),
        variant == "beni-cudagraphs",
        variant == "beni-full-logits",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BeniForConditionalGeneration(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = shard(
        model.train(), torch.device("cuda"), torch.distributed.get_world_size(), compile=compile or cudagraphs, cuda_graphs=cudagraphs
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), fused=True)
    pixels = DevicePixels(image_processor_for(config), torch.device("cuda"))
    if full_logits:

        def step():  # the loss as transformers computes it: logits at every position
            labels = batch["labels"]
            num_items = (labels[:, 1:] != IGNORE_INDEX).sum().cuda()
            with torch.autocast("cuda", torch.bfloat16):
                inputs = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
                inputs["pixel_values"] = pixels(inputs["pixel_values"])
                loss = model(**inputs, num_items_in_batch=num_items, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:

        def step():
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the graphs may reuse the last step's buffers
            train_step(
                model,
                [batch],
                optimizer,
                trainable,
                1.0,
                config,
                torch.device("cuda"),
                pixels,
                {"ocr": 1.0} if "ocr" in config.extensions else None,
            )

    return timed(step, warmup, steps, profile)


def scaling(args) -> None:
    """Each process count under torchrun (FSDP across the GPUs, each rank a batch of its own), then samples/s and the
    scaling efficiency against the first count: samples/s at n / (samples/s at the first * n / first)."""
    runs = {}
    for n in args.processes:
        out = f"{os.path.splitext(args.out)[0]}_{n}.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            __file__,
            "--out",
            out,
            "--configs",
            *args.configs,
            "--variants",
            *args.variants,
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
        ]
        subprocess.run(command, check=True)
        runs[n] = {(r["config"], r["variant"]): r for r in json.loads(Path(out).read_text())["runs"]}
    first = args.processes[0]
    print(f"\n{'config':6} {'variant':17} {'GPUs':>4} {'samples/s':>9}  scaling")
    for key, base in runs[first].items():
        for n, rows in runs.items():
            row = rows.get(key, {})
            if "samples_per_s" in row and "samples_per_s" in base:
                efficiency = row["samples_per_s"] / (base["samples_per_s"] * n / first)
                print(f"{key[0]:6} {key[1]:17} {n:4} {row['samples_per_s']:9.1f}  {efficiency:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=["peer", "beni-full-logits", "beni", "beni-compile", "beni-cudagraphs"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="train_throughput.json")
    parser.add_argument("--profile", action="store_true", help="also measure each variant's GPU-busy share and print its busiest kernels")
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        help="FSDP scaling: the beni variants under torchrun with each of these process counts (one GPU each), against the first",
    )
    args = parser.parse_args()
    if args.processes and "RANK" not in os.environ:
        return scaling(args)
    setup_distributed(TrainConfig(shards="", output_dir="", device="cuda"))
    world = torch.distributed.get_world_size()
    if torch.distributed.get_rank():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 reports for all
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_tflops": peak, "runs": []}
    for name in args.configs:
        spec = CONFIGS[name]
        for variant in args.variants:
            config = beni_config(spec, variant)
            batch = synthetic_batch(spec, config.num_image_tokens(), "ocr" in config.extensions)
            seq = config.num_image_tokens() + spec["text_len"]
            flops = train_flops(config, spec["batch"] * seq, seq, spec["batch"])
            row = {"config": name, "variant": variant, "batch": spec["batch"], "seq": seq, "processes": world}
            if variant == "peer" and ("connector" in spec or world > 1):
                print(
                    f"{name}: no peer ({'Llava has no ' + spec['connector'] + ' connector' if 'connector' in spec else 'one GPU only'})",
                    flush=True,
                )
                continue
            for checkpointing in (False, True):
                torch.cuda.reset_peak_memory_stats()
                try:
                    if variant == "peer":
                        seconds, busy = run_peer(spec, batch, args.warmup, args.steps, args.profile)
                    else:
                        seconds, busy = run_beni(spec, batch, args.warmup, args.steps, variant, checkpointing, args.profile)
                    row.update(
                        seconds_per_step=seconds,
                        samples_per_s=world * spec["batch"] / seconds,
                        tokens_per_s=world * spec["batch"] * seq / seconds,
                        mfu=flops / seconds / (peak * 1e12),
                        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                        activation_checkpointing=checkpointing,
                        gpu_busy=busy,
                    )
                    row.pop("error", None)
                    break
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                    if variant == "peer":
                        break
                except Exception as e:  # noqa: BLE001 - one broken variant must not cost the others' numbers
                    row["error"] = repr(e)[:500]
                    break
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch._dynamo.reset()
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            with open(args.out if not torch.distributed.get_rank() else os.devnull, "w") as f:
                json.dump(results, f, indent=1)
    print(f"\n{'config':6} {'variant':17} {'samples/s':>9} {'tokens/s':>9} {'MFU':>6} {'mem GiB':>8}  vs peer")
    for row in results["runs"]:
        peer = next((r for r in results["runs"] if r["config"] == row["config"] and r["variant"] == "peer"), {})
        if "samples_per_s" not in row:
            print(f"{row['config']:6} {row['variant']:17} {row.get('error')}")
            continue
        ratio = row["samples_per_s"] / peer["samples_per_s"] if "samples_per_s" in peer else float("nan")
        print(
            f"{row['config']:6} {row['variant']:17} {row['samples_per_s']:9.1f} {row['tokens_per_s']:9.0f} {row['mfu']:6.1%} "
            f"{row['peak_memory_gib']:8.1f}  {ratio:.2f}x{' (AC)' if row['activation_checkpointing'] else ''}"
        )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
