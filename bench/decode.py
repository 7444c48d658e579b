"""Greedy decode throughput of a beni model through transformers' generate: dynamic cache, static cache, and static
cache compiled (on every device), same prompts and tokens, in one process, the variants timed in turns. At commit
757f4af it also timed beni's hand-written loop over a static cache (`greedy_generate`), since removed: see
bench/BENCHMARKS.md, "Decode".

    python bench/decode.py --batch 8 --new-tokens 32 --repeats 5
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CompileConfig

from beni_model.chat import load_tokenizer, prompt_text
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import BeniProcessor
from beni_model.tiny import tiny_llm

VISION = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def build(folder: Path):
    llm = tiny_llm(folder / "llm")
    config = BeniConfig(vision_config={**VISION, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}, text_model=str(llm))
    tokenizer = load_tokenizer(str(llm))
    torch.manual_seed(0)
    model = BeniForConditionalGeneration.from_parts(config, tokenizer).eval()
    return model, BeniProcessor.for_model(model.config, tokenizer)


def timed(variants: dict, repeats: int) -> dict[str, tuple[float, torch.Tensor]]:
    """Median seconds and output of each variant, timed in turns (one run of each per round), so a busy spell of a
    shared machine falls on every variant alike. Each runs once untimed first (the compiled one compiles then)."""
    outputs = {name: run() for name, run in variants.items()}
    seconds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            outputs[name] = run()
            seconds[name].append(time.perf_counter() - start)
    return {name: (statistics.median(seconds[name]), outputs[name]) for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build(Path(tmp))
    questions = [f"What is written in image {i}?" + " Read it." * (i % 3) for i in range(args.batch)]
    texts = [prompt_text([{"from": "human", "value": f"<image>\n{q}"}], processor) for q in questions]
    images = [torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy() for _ in questions]
    inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    common = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    compiled = CompileConfig()
    compiled._compile_all_devices = True  # transformers compiles on GPUs only unless told
    variants = {
        "generate, dynamic cache": lambda: model.generate(**inputs, **common),
        "generate, static cache": lambda: model.generate(**inputs, **common, cache_implementation="static"),
        "generate, static cache, compiled": lambda: model.generate(
            **inputs, **common, cache_implementation="static", compile_config=compiled
        ),
    }
    print(f"batch {args.batch}, {args.new_tokens} new tokens, {torch.get_num_threads()} thread(s), median of {args.repeats} rounds")
    results = timed(variants, args.repeats)
    reference = next(iter(results.values()))[1]
    for name, (seconds, out) in results.items():
        same = torch.equal(out, reference)
        print(f"{name:34s} {args.batch * args.new_tokens / seconds:9.1f} tokens/s  {seconds * 1000:8.1f} ms  same tokens: {same}")


if __name__ == "__main__":
    main()
