"""QLoRA (the LLM in 4-bit NF4 through bitsandbytes) against LoRA on the bf16 LLM: loss at the start and the end,
steps/s and peak CUDA memory, alone and under FSDP2 on one process; then the adapters are saved, loaded onto a fresh
base and checked to give the same adapter weights and logits. The model is built and wrapped as the trainer builds
it (`BeniForConditionalGeneration.from_parts`, `adapters.add_lora`, the trainer's transformer blocks as FSDP units);
the data is a toy task made here (a solid-colour square, asked for its colour), so the run needs no shards.

    # on a GPU machine, bitsandbytes installed (--shape: an LLM of SmolLM2-1.7B's shape, random weights, no hub;
    # one process: each rank would build its own copy in its own scratch folder):
    python bench/qlora.py --shape 1.7b --steps 300                                  # alone
    torchrun --nproc-per-node 1 bench/qlora.py --shape 1.7b --steps 300 --fsdp      # under FSDP, one process
    # on a CPU, the plumbing only (no bitsandbytes: LoRA on the fp32 LLM):
    python bench/qlora.py --tiny --variants lora --steps 20
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel
from PIL import Image
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from beni_model.adapters import add_lora
from beni_model.chat import build_example, load_tokenizer, pad_batch
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import BeniProcessor
from beni_model.tiny import tiny_llm
from beni_model.training.parallel import transformer_blocks

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
VISION = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
VISION.update(num_attention_heads=4, image_size=32, patch_size=8)
# LLM shapes built here with random weights: memory and speed depend on the shape, and the toy task trains any of them.
SHAPES = {
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32},
}


def text_model(args, scratch: Path) -> str:
    if args.text_model:
        return args.text_model
    tiny = tiny_llm(scratch / "tiny_llm")
    if args.tiny:
        return str(tiny)
    folder = scratch / f"llm_{args.shape}"
    if dist.get_rank() == 0:  # SmolLM2's shape and vocabulary, tied embeddings, the tiny LLM's tokenizer
        torch.manual_seed(args.seed)
        config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, **SHAPES[args.shape])
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    dist.barrier()
    return str(folder)


def build(args, llm: str, quantized: bool, device: torch.device):
    """The model as the trainer builds it for a LoRA stage, with the same seed for every variant and reload."""
    torch.manual_seed(args.seed)
    config = BeniConfig(vision_config=VISION, text_model=llm, connector="mlp2x_gelu")
    tokenizer = load_tokenizer(llm, config.image_token)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model = BeniForConditionalGeneration.from_parts(config, tokenizer, dtype=dtype, load_in_4bit=quantized)
    if not quantized:  # from_parts puts a 4-bit model on the GPU itself
        model.to(device)
    return model, BeniProcessor.for_model(model.config, tokenizer)


def batches(processor, count: int, batch_size: int, seed: int, device: torch.device) -> list[dict]:
    """`count` batches of the toy task, the same for every variant."""
    rng, names, out = random.Random(seed), list(COLOURS), []
    for _ in range(count):
        picked = [rng.choice(names) for _ in range(batch_size)]
        conversations = [[{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": c}] for c in picked]
        examples = [build_example(c, processor) for c in conversations]
        batch = pad_batch([e.input_ids for e in examples], processor.tokenizer.pad_token_id, labels=[e.labels for e in examples])
        images = [Image.new("RGB", (40, 32), COLOURS[c]) for c in picked]
        batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def wrap_fsdp(model, device: torch.device) -> None:
    """FSDP2 as the trainer shards (each transformer block a unit, the rest the root), also on one process, where the
    trainer itself skips FSDP."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    )
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits.float().cpu()


def run_variant(args, llm: str, variant: str, device: torch.device, out: Path) -> dict:
    quantized = variant == "qlora"
    model, processor = build(args, llm, quantized, device)
    peft = add_lora(model, rank=args.rank, alpha=2 * args.rank, dropout=0.0)
    if args.fsdp:
        wrap_fsdp(peft, device)
    data = batches(processor, args.steps + 1, args.batch_size, args.seed, device)
    trainable = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, started = [], None
    peft.train()
    for step, batch in enumerate(data[:-1]):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = peft(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    peft.eval()
    probe = data[-1]
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        trained = logits_of(peft, probe)
    # The full (gathered) state under FSDP; PEFT keeps the adapters' and the connector's (modules_to_save) of it.
    state = get_model_state_dict(peft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    folder = out / f"{variant}{'_fsdp' if args.fsdp else ''}"
    if dist.get_rank() == 0:
        peft.save_pretrained(folder, state_dict=state)
    dist.barrier()
    base, _ = build(args, llm, quantized, device)
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        again = logits_of(reloaded, probe)
    saved = {k: v for k, v in state.items() if "lora_" in k}
    loaded = reloaded.state_dict()
    same_weights = bool(saved) and all(torch.equal(v.cpu(), loaded[k].cpu()) for k, v in saved.items())
    window = max(1, min(10, len(losses) // 4))
    return {
        "variant": variant,
        "fsdp": args.fsdp,
        "dtype": "nf4" if quantized else str(next(p for p in base.parameters() if p.is_floating_point()).dtype).removeprefix("torch."),
        "loss_start": round(sum(losses[:window]) / window, 4),
        "loss_end": round(sum(losses[-window:]) / window, 4),
        "steps_per_s": round((len(losses) - args.warmup) / seconds, 3),
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "adapters_reload_identical": same_weights,
        "reloaded_logits_max_diff": float((trained - again).abs().max()),
        "adapter_folder": str(folder),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of steps/s")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the ranks (run under torchrun), also on one process")
    parser.add_argument("--text-model", help="an LLM folder (with its tokenizer) instead of --shape")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.7b", help="the LLM's shape, built with random weights")
    parser.add_argument("--tiny", action="store_true", help="the tiny LLM: the script's plumbing in seconds, CPU included")
    parser.add_argument("--out", type=Path, help="where the adapters and results.json go (default: a temporary folder)")
    args = parser.parse_args()
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}: give more steps.")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if "qlora" in args.variants and device.type != "cuda":
        parser.error("qlora needs a CUDA GPU with bitsandbytes: on this machine run --variants lora.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:  # plain python: a one-process group, so saving and barriers read the same either way
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "out"
        llm = text_model(args, Path(scratch))
        results = []
        for variant in args.variants:
            try:
                results.append(run_variant(args, llm, variant, device, out))
            except Exception as error:  # one variant's failure (bitsandbytes under FSDP, say) is a result, not the end of the run
                results.append({"variant": variant, "fsdp": args.fsdp, "error": f"{type(error).__name__}: {error}"})
            if dist.get_rank() == 0:
                print(json.dumps(results[-1]), flush=True)
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"results{'_fsdp' if args.fsdp else ''}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
