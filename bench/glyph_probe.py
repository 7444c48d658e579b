"""Can the GPU recipe's model learn to see letters? One large printed character (36 classes) per image (or a
string of `--chars` of them, to see whether letters are read in order too), the recipe's own model
(SigLIP-configured ViT from scratch -> connector -> SmolLM2-135M), trained for a few hundred steps by the real
trainer with one thing changed per variant, then asked "What is written in the image?" on held-out characters.
The `vit` variant is the reference: the same ViT with a linear head on its mean feature, no LLM. Variants ending
in `_patchify` use the encoder's own linear patch embedding instead of the recipe's conv stem; variants ending in
`_reading` add the trainer's reading loss (the ocr extension's `weight`: CTC from its reading head on the vision tower's
columns), which ties each character to its place in the line; `frozen_llm_ctc` instead scores the image tokens
against the frozen LLM's embeddings with CTC (`run_ctc`, one process).

    python bench/glyph_probe.py data --data /tmp/glyph                 # 40,000 training and 300 test images
    python bench/glyph_probe.py run  --data /tmp/glyph [--variants frozen_llm frozen_llm_patchify vit vit_patchify] [--steps 400]
    python bench/glyph_probe.py data --data /tmp/glyph3 --chars 3 && python bench/glyph_probe.py run --data /tmp/glyph3 --variants frozen_llm
    python bench/glyph_probe.py data --data /tmp/g4 --chars 4 && python bench/glyph_probe.py run --data /tmp/g4 --steps 600 --variants llm_low_lr_reading
    python bench/glyph_probe.py data --data /tmp/g --samples 2000 --test 20 && python bench/glyph_probe.py run --data /tmp/g --recipe tiny --steps 5

Each variant prints one JSON line (exact-match accuracy on the test strings, the share of characters right in
place, final loss, seconds) and adds it to DATA/results.jsonl. The `vit` variants classify one character: they
need `--chars 1`.
"""

import argparse
import dataclasses
import io
import json
import multiprocessing
import random
import subprocess
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig

from beni_model.chat import IGNORE_INDEX, load_tokenizer
from beni_model.data import (
    DataPosition,
    DataSettings,
    DevicePixels,
    decode_image,
    make_loader,
    read_samples,
    shard_paths,
)
from beni_model.evaluate import EvalSettings, evaluate, load_for_eval
from beni_model.processing import BeniProcessor, family_image_processor, sized
from beni_model.recipe import builtin_recipes, load_recipe
from beni_model.train import torchrun_command
from beni_model.training.config import TrainConfig
from beni_model.training.model import build_model
from beni_model.training.optim import lr_factor, param_groups
from beni_model.vision import vision_encoder_from_config
from beni_pipeline.prep import synthetic as syn

GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
QUESTION = "What is written in the image?"
PER_SHARD = 1000
FROZEN_LLM = {"train_parts": ["vision_tower", "connector"], "lr": 1e-3}
VARIANTS = {  # TrainConfig fields changed from the recipe's finetune stage
    "base": {},
    "vision_lr": {"part_lr": {"vision_tower": 1e-3, "connector": 1e-3}},
    "frozen_llm": FROZEN_LLM,
    "frozen_llm_patchify": {**FROZEN_LLM, "vision_stem": None},
    "frozen_llm_low_lr": {**FROZEN_LLM, "lr": 3e-4},
    "llm_low_lr": {"part_lr": {"vision_tower": 1e-3, "connector": 1e-3}, "lr": 2e-5},
    "frozen_llm_ctc": FROZEN_LLM,  # + a CTC loss on the image tokens against the LLM's embeddings (run_ctc)
    "frozen_llm_reading": {**FROZEN_LLM, "extensions": {"ocr": {"weight": 1.0}}},
    "llm_low_lr_reading": {"part_lr": {"vision_tower": 1e-3, "connector": 1e-3}, "lr": 2e-5, "extensions": {"ocr": {"weight": 1.0}}},
    "vit": {"lr": 1e-3},
    "vit_patchify": {"lr": 1e-3, "vision_stem": None},
}


def glyph(seed: str, chars: int) -> tuple[str, bytes]:
    rng = random.Random(seed)
    text = "".join(rng.choices(GLYPHS, k=chars))
    image = syn.render_text(rng, text, syn.text_style(rng, backgrounds=("plain", "textured"), size=(60, 90), blur=False))
    return text, syn.jpeg(image)


def write_shard(task: tuple[Path, int, int]) -> dict:
    folder, k, chars = task
    name = f"glyphs-{k:05d}.tar"
    with tarfile.open(folder / name, "w") as tar:
        for i in range(k * PER_SHARD, (k + 1) * PER_SHARD):
            text, jpg = glyph(f"glyph:{i}", chars)
            meta = {
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": text}],
                "transcript": text,
            }
            for ext, data in (("json", json.dumps(meta).encode()), ("jpg", jpg)):
                info = tarfile.TarInfo(f"{i:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"url": name, "nsamples": PER_SHARD}


def make_data(args) -> None:
    shards, test = args.data / "shards", args.data / "test"
    shards.mkdir(parents=True, exist_ok=True)
    test.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool() as pool:
        entries = pool.map(write_shard, [(shards, k, args.chars) for k in range(args.samples // PER_SHARD)])
    (shards / "index.json").write_text(json.dumps({"wids_version": 1, "name": "glyphs", "chars": args.chars, "shardlist": entries}))
    items = []
    for i in range(args.test):
        text, jpg = glyph(f"test:{i}", args.chars)
        (test / f"{i}.jpg").write_bytes(jpg)
        items.append(
            {"dataset_name": "glyphs", "id": i, "image_path": f"{i}.jpg", "question": QUESTION, "answers": [text], "type": "glyph"}
        )
    (test / "test.json").write_text(json.dumps(items))


def stage_config(args, name: str) -> TrainConfig:
    """The recipe's last stage, trained from the recipe's parts instead of the stage before it."""
    configs = load_recipe(args.recipe).train_configs(args.data / "shards", args.data / "runs", args.data / "parts")
    first, last = configs[0], configs[-1]
    parts = {k: getattr(first, k) for k in ("text_model", "vision_model", "vision_config", "connector", "vision_stem", "image_size")}
    changes = {"extensions": {}, **VARIANTS[name]}  # the ocr extension only where a variant asks for it
    return dataclasses.replace(
        last,
        output_dir=str(args.data / "runs" / name),
        init_from=None,
        max_steps=args.steps,
        warmup_steps=min(50, args.steps // 2),
        compile=False,
        **parts,
        **changes,
    )


def run_vlm(args, name: str, chars: int) -> dict:
    config = stage_config(args, name)
    path = args.data / "runs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(config)))
    subprocess.run(torchrun_command(path, 1), check=True)
    model, tokenizer = load_for_eval(Path(config.output_dir) / "final")
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    result = score(args, model, tokenizer, Path(config.output_dir), chars, [r["loss"] for r in rows])
    if reading := [r["extension_loss"] for r in rows if "extension_loss" in r][-50:]:
        result["reading_loss"] = sum(reading) / len(reading)
    return result


def score(args, model, tokenizer, run_dir: Path, chars: int, losses: list[float]) -> dict:
    """Exact matches and characters right in place on the test strings (and the reading head's exact matches, where
    the model has one), and the mean loss of the last 50 steps."""
    out = run_dir / "eval"
    evaluate(
        model, tokenizer, args.data / "test" / "test.json", args.data / "test", out, EvalSettings(batch_size=100, max_new_tokens=chars + 3)
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    in_place = sum(a == b for r in rows for a, b in zip(r["prediction"].strip(), r["answers"][0])) / (chars * len(rows))
    result = {
        "accuracy": sum(r["prediction"].strip() == r["answers"][0] for r in rows) / len(rows),
        "chars_in_place": round(in_place, 3),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
    }
    if "head_answer" in rows[0]:
        result["head_exact"] = sum(r["head_answer"] == r["answers"][0] for r in rows) / len(rows)
    return result


def run_ctc(args, name: str, chars: int) -> dict:
    """The variant's stage plus a CTC loss of the image tokens in raster order scored against the frozen LLM's own
    input embeddings (+ a learned blank), pushing them to be the answer's tokens for the LLM to copy. One process,
    the trainer's data, model and schedule."""
    config = stage_config(args, name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(config.text_model)
    model = build_model(config, tokenizer).to(device).train()
    beni = model.config
    settings = DataSettings(
        shards=config.shards,
        batch_size=config.batch_size,
        image_size=beni.image_size,
        max_length=config.max_length,
        seed=config.seed,
    )
    processor = BeniProcessor.for_model(beni, tokenizer)
    batches = iter(make_loader(settings, processor, 0, 1, DataPosition(), config.workers, device.type == "cuda"))
    pixels = DevicePixels(processor.image_processor, device)
    embed = model.get_input_embeddings()
    blank = torch.nn.Parameter(torch.zeros(embed.weight.shape[1], device=device))
    params = [p for p in model.parameters() if p.requires_grad] + [blank]
    groups = param_groups(model, config) + [{"params": [blank], "lr": config.part_lr.get("vision_tower", config.lr), "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))  # as the trainer schedules
    losses = []
    for step in range(config.max_steps):
        batch = next(batches)
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        answers = [tokenizer.decode(row[row != IGNORE_INDEX], skip_special_tokens=True).strip() for row in batch["labels"]]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            image = model.connector(model.vision_tower(pixels(batch["pixel_values"])))
            embeds = embed(ids).masked_scatter((ids == beni.image_token_id).unsqueeze(-1), image.to(embed.weight.dtype))
            logits = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device)).logits
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        tokens = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
        vocab = sorted({t for row in tokens for t in row})
        index = {t: i + 1 for i, t in enumerate(vocab)}
        targets = [[index[t] for t in row] for row in tokens]
        scores = image.float() @ torch.cat([blank[None], embed.weight[vocab].float()]).T  # [batch, image tokens, 1 + vocab]
        ctc = torch.nn.functional.ctc_loss(
            scores.log_softmax(-1).transpose(0, 1),
            torch.tensor([t for row in targets for t in row], device=device),
            torch.full((len(ids),), scores.shape[1], device=device),
            torch.tensor([len(r) for r in targets], device=device),
            zero_infinity=True,
        )
        optimizer.zero_grad()
        (lm + ctc).backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(lm.item())
        if step % 50 == 0:
            print(f"step {step} lm {lm.item():.3f} ctc {ctc.item():.3f}", flush=True)
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    return score(args, model, tokenizer, Path(config.output_dir), chars, losses)


class Glyphs(torch.utils.data.Dataset):
    """(pixel values [3, size, size], class) pairs from the training tars, preprocessed as the trainer preprocesses."""

    def __init__(self, shards: Path, processor):
        self.processor = processor
        self.items = [
            (sample["jpg"], GLYPHS.index(json.loads(sample["json"])["conversations"][1]["value"]))
            for path in shard_paths(shards)
            for sample in read_samples(path)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        data, label = self.items[i]
        return self.processor(decode_image(data), return_tensors="pt")["pixel_values"][0], label


def run_vit(args, name: str) -> dict:
    """The recipe's ViT alone, mean-pooled into a linear head over the 36 characters: how fast it learns letters."""
    config = stage_config(args, name)
    vision = AutoConfig.for_model(**config.vision_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(config.seed)
    encoder = vision_encoder_from_config(vision, config.vision_stem).to(device)
    head = torch.nn.Linear(vision.hidden_size, len(GLYPHS)).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95))

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            return head(encoder(pixel_values=pixels.to(device)).last_hidden_state.mean(1)).float()

    processor = sized(family_image_processor(vision), vision.image_size)
    data = Glyphs(Path(config.shards), processor)
    sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=config.max_steps * config.batch_size)
    loader = torch.utils.data.DataLoader(data, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers)
    losses = []
    for step, (pixels, targets) in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(logits(pixels), targets.to(device))
        optimizer.zero_grad()
        loss.backward()
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)):
            continue  # as the trainer does: a non-finite step is skipped, not applied
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
        optimizer.step()
        losses.append(loss.item())
    items = json.loads((args.data / "test" / "test.json").read_text())
    pixels = processor([decode_image((args.data / "test" / i["image_path"]).read_bytes()) for i in items], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        predicted = torch.cat([logits(chunk).argmax(-1).cpu() for chunk in pixels.split(100)])
    right = sum(GLYPHS[p] == i["answers"][0] for p, i in zip(predicted.tolist(), items))
    return {"accuracy": right / len(items), "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def run(args) -> None:
    chars = json.loads((args.data / "shards" / "index.json").read_text()).get("chars", 1)
    if chars != 1 and any(name.startswith("vit") for name in args.variants):
        raise SystemExit(f"the vit variants classify one character; {args.data} holds strings of {chars}")
    for name in args.variants:
        start = time.perf_counter()
        run_one = run_vit if name.startswith("vit") else run_ctc if name == "frozen_llm_ctc" else run_vlm
        result = run_one(args, name) if run_one is run_vit else run_one(args, name, chars)
        row = {"variant": name, "steps": args.steps, **VARIANTS[name], **result, "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        with open(args.data / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["data", "run"])
    parser.add_argument("--data", type=Path, default=Path("bench/out/glyph"))
    parser.add_argument("--samples", type=int, default=40_000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--chars", type=int, default=1, help="characters per image (data step)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument(
        "--recipe", default="smollm2-siglip", choices=builtin_recipes(), help="whose finetune stage (tiny: a CPU smoke run)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    {"data": make_data, "run": run}[args.step](args)


if __name__ == "__main__":
    main()
