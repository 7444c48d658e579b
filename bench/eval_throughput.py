"""Eval generation throughput: beni's batched `generate` (what the eval runs) against transformers' own
`LlavaForConditionalGeneration.generate` on the same weights, prompts and shapes, in the same run; on CUDA also over
a static cache, which transformers compiles (`beni_compiled`, EvalSettings.compile_decode).

Both models are built from config classes with random weights (the LLaVA one holds beni's weights in LLaVA's
layout, see beni_model.export), bf16 on the GPU. Each item is an OCRBench-like prompt: one image (its image
tokens) plus a question of 12-40 tokens, left-padded into batches; every item generates exactly --new-tokens
tokens (min_new_tokens), so every side does the same work. Batch sizes are swept; each (contender, batch size) first
runs once untimed (`untimed_first_run_s`: where `beni_compiled` compiles its decode step or captures the CUDA graph for
a new batch size or cache length), then is timed once per rotation of the contenders' order, and the best run counts.

    PYTHONUNBUFFERED=1 python bench/eval_throughput.py [--items 512] [--batch-sizes 16 64 128 256] [--tiny]
"""

import argparse
import json
import platform
import random
import time

import torch
from transformers import LlamaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from beni_model.config import BeniConfig
from beni_model.export import llava_config, llava_state_dict
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.tiny import TINY_LLAMA

# SigLIP-B/16-224 + SmolLM2-135M shapes (the "small" config of DESIGN.md), or a tiny one for a CPU smoke run.
SMALL = (
    SiglipVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16
    ),
    LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
)
TINY = (
    SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    LlamaConfig(vocab_size=512, **TINY_LLAMA),
)


def build(tiny: bool, device: str, dtype: torch.dtype):
    vision, text = TINY if tiny else SMALL
    text.vocab_size += 1  # the image token, as chat.load_tokenizer adds it
    config = BeniConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), connector="mlp2x_gelu", image_token_id=text.vocab_size - 1
    )
    torch.manual_seed(0)
    beni = BeniForConditionalGeneration(config).to(device, dtype).eval()
    llava = LlavaForConditionalGeneration(llava_config(beni)).to(device, dtype).eval()
    llava.load_state_dict(llava_state_dict(beni), strict=False)
    llava.generation_config.suppress_tokens = beni.generation_config.suppress_tokens  # as export_llava writes it
    return beni, llava


def make_items(n: int, config: BeniConfig, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    image = [config.image_token_id] * config.num_image_tokens()
    return [[1] + image + [rng.randrange(2, config.image_token_id) for _ in range(rng.randint(12, 40))] for _ in range(n)]


def batches(items: list[list[int]], batch_size: int, image_size: int, device: str, dtype: torch.dtype):
    """Left-padded batches of prompts of similar length (longest first) with their pixel values, built up front."""
    items = sorted(items, key=len, reverse=True)
    out = []
    for start in range(0, len(items), batch_size):
        rows = items[start : start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        pixels = torch.randn(len(rows), 3, image_size, image_size, device=device, dtype=dtype)
        out.append((ids, mask, pixels))
    return out


def run(model, prepared, new_tokens: int, device: str, compile: bool = False) -> tuple[float, list[torch.Tensor]]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = []
    with torch.no_grad():
        for ids, mask, pixels in prepared:
            kwargs = {
                "input_ids": ids,
                "attention_mask": mask,
                "pixel_values": pixels,
                "max_new_tokens": new_tokens,
                "min_new_tokens": new_tokens,
                "pad_token_id": 0,
                "eos_token_id": 2,
            }
            static = {"cache_implementation": "static"} if compile else {}  # as EvalSettings.compile_decode
            outputs.append(model.generate(**kwargs, do_sample=False, **static))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    beni, llava = build(args.tiny, device, dtype)
    contenders = {"beni": (beni, False), "beni_compiled": (beni, True), "llava": (llava, False)}  # name: (model, compile)
    if device != "cuda":
        del contenders["beni_compiled"]  # transformers compiles a static cache's step on GPUs only
    items = make_items(args.items, beni.config)
    print(
        f"device {torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}, torch {torch.__version__}, "
        f"{args.items} items, {beni.config.num_image_tokens()} image tokens + 12-40 question tokens, {args.new_tokens} new tokens each"
    )
    results = []
    for batch_size in args.batch_sizes:
        prepared = batches(items, batch_size, beni.config.image_size, device, dtype)
        untimed = {name: round(run(m, prepared, args.new_tokens, device, c)[0], 2) for name, (m, c) in contenders.items()}
        times = {name: [] for name in contenders}
        outputs = {}
        names = list(contenders)
        for shift in range(len(names)):  # each contender first once, to cancel drift
            for name in names[shift:] + names[:shift]:
                model, compile = contenders[name]
                seconds, outputs[name] = run(model, prepared, args.new_tokens, device, compile)
                times[name].append(seconds)
        row = {"batch_size": batch_size, **{f"{k}_samples_per_s": round(args.items / min(v), 1) for k, v in times.items()}}
        for name in contenders:
            if name != "llava":
                same_rows = sum(
                    int((a == b).all(1).sum()) for a, b in zip(outputs[name], outputs["llava"])
                )  # every item makes --new-tokens
                row[f"{name}_same_rows"] = same_rows
                row[f"{name}_ratio"] = round(row[f"{name}_samples_per_s"] / row["llava_samples_per_s"], 3)
        row["untimed_first_run_s"] = untimed
        if device == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results.append(row)
        print(json.dumps(row))
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
