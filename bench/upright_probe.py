"""Does the ocr extension's axes head (`upright`) learn which way text runs from a tower trained to read, without
training the tower? A CPU-sized beni model (a conv-stem SigLIP ViT of 4 x 128 at 128 px, patches of 8) trains its
reading head on the corpus's one-line texts (`OcrExtension.reading_loss`, as the recipe's encoder stage) while the
axes head learns on turned copies of the batch through the tower without gradient (`OcrExtension.axes_loss`); then
it reads new texts turned by 30-90 degrees either way (the eval's rotated text: held-out words, `ocr_eval.rotated`'s
draw) and level ones:

- the axes head's baseline error (its line against the text's, modulo a half turn, in the squashed square frame);
- how often the model levels an image (`upright.off_level`): turned texts should be, level ones not;
- the reading head's exact reads with levelling (`refine_features`) off and on.

`--through-tower` trains the axes head as the first GPU run did instead: the copies' gradient through the tower.

    python bench/upright_probe.py [--steps 1500] [--samples 6000] [--through-tower]

Prints one JSON line.
"""

import argparse
import json
import math
import random
import time

import numpy as np
import torch
from PIL import Image

from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.ocr import upright
from beni_model.ocr.heads import greedy_transcripts, reading_targets
from beni_pipeline.prep import ocr_eval
from beni_pipeline.prep import synthetic as syn

SIZE, PATCH, WIDTH = 128, 8, 128


def build() -> BeniForConditionalGeneration:
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": SIZE,
        "patch_size": PATCH,
    }
    text = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    config = BeniConfig(
        vision_config=vision, text_config=text, vision_stem="conv", image_token_id=63, extensions={"ocr": {"upright": True}}
    )
    torch.manual_seed(0)
    return BeniForConditionalGeneration(config)


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """As SigLIP's processor: squashed to the square, scaled to -1..1."""
    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def training_set(samples: int) -> tuple[torch.Tensor, list[str]]:
    """The corpus's words, digit strings and random strings, as the corpus draws them (up to 25 degrees of tilt)."""
    kinds = {"word": 14, "digits": 10, "random": 10}
    drawn = [syn.make_sample(0, i, kinds) for i in range(samples)]
    return pixels([d.image for d in drawn]), [d.transcript for d in drawn]


def test_set(n: int, turned: bool) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Held-out words, turned by 30-90 degrees either way (as `ocr_eval.rotated`) or level; with each baseline's
    direction in the squashed square frame."""
    rng, images, texts, baselines = random.Random(f"upright:{turned}"), [], [], []
    for _ in range(n):
        text = syn.word(rng, ocr_eval.HELD_OUT)
        angle = rng.choice((-1, 1)) * rng.uniform(30, 90) if turned else 0.0
        image = syn.render_text(rng, text, syn.text_style(rng, rotation=angle, size=(28, 64)))
        a = math.radians(angle)  # PIL turns counter-clockwise; y runs down
        direction = torch.tensor([math.cos(a) * SIZE / image.width, -math.sin(a) * SIZE / image.height])
        images.append(image), texts.append(text), baselines.append(direction / direction.norm())
    return pixels(images), texts, torch.stack(baselines)


def axes_loss_through_tower(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """`OcrExtension.axes_loss` as the first GPU run trained it: the copies (all images here have level text) pass
    the tower with gradient, in its training mode."""
    chosen = torch.arange(max(1, len(pixel_values) // 8))
    axes = upright.random_axes(len(chosen), pixel_values.device)
    grid = model.vision_tower.patch_grid(model.vision_tower(upright.turned_copies(pixel_values[chosen], axes)))
    logits = model.extensions["ocr"].axes_head(grid)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), upright.angle_classes(axes).flatten()) * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--through-tower", action="store_true", help="train the axes head as the first GPU run did")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    images, transcripts = training_set(args.samples)
    drawn = time.perf_counter() - start
    model = build().train()
    ocr, tower = model.extensions["ocr"], model.vision_tower
    optimizer = torch.optim.AdamW([*tower.parameters(), *ocr.parameters()], lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=args.steps, pct_start=0.1)
    rng = random.Random(0)
    for step in range(args.steps):
        chosen = rng.sample(range(len(transcripts)), args.batch)
        targets = dict(zip(("reading_targets", "reading_lengths"), reading_targets([transcripts[i] for i in chosen])))
        if args.through_tower:  # the reading loss alone from the extension, then the axes through the tower
            ocr.options.upright = False
            loss = model(pixel_values=images[chosen], extension_targets=targets).extension_losses["ocr"]
            loss = loss + axes_loss_through_tower(model, images[chosen])
            ocr.options.upright = True
        else:
            loss = model(pixel_values=images[chosen], extension_targets=targets).extension_losses["ocr"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step}: ocr loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    result = {"steps": args.steps, "samples": args.samples, "through_tower": args.through_tower, "draw_seconds": round(drawn, 1)}
    with torch.no_grad():
        for name, turned in (("turned", True), ("level", False)):
            test, texts, baselines = test_set(args.test, turned)
            features = tower(test)
            tilted, axes = upright.off_level(ocr.axes_head(tower.patch_grid(features)))
            error = torch.rad2deg(torch.acos((axes[:, :, 0] * baselines).sum(-1).abs().clamp(max=1)))
            ocr.options.upright = False
            plain = greedy_transcripts(ocr.reading_scores(model, model.vision_features(test)))
            ocr.options.upright = True
            levelled = greedy_transcripts(ocr.reading_scores(model, model.vision_features(test)))
            result[name] = {
                "baseline_error_median_degrees": round(float(error.median()), 1),
                "baseline_within_15_degrees": round(float((error <= 15).float().mean()), 3),
                "levelled": round(float(tilted.float().mean()), 3),
                "read_without_levelling": round(sum(r == t for r, t in zip(plain, texts)) / len(texts), 3),
                "read_with_levelling": round(sum(r == t for r, t in zip(levelled, texts)) / len(texts), 3),
            }
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
