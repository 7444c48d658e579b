"""The extension interface with a toy extension defined here alone: no core file knows it."""

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.data import DataPosition, DataSettings, DevicePixels, make_loader
from beni_model.extensions import Extension, register
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import load_processor
from beni_model.training.config import TrainConfig
from beni_model.training.loop import train
from beni_model.training.metrics import read_metrics
from beni_model.vision import stem_flops
from tests.model.test_data import COLOURS, write_toy_shards


@register("mean_colour")
class MeanColour(Extension):
    """A head that guesses an image's colour from the mean of its vision features, trained on the colour its caption
    names ("a red square"); with `token`, its guess reaches the LLM as one more token per image."""

    batch_keys = ("colour",)

    def __init__(self, config, settings: dict):
        super().__init__(config, settings)
        self.head = nn.Linear(config.vision_config.hidden_size, 3)
        if settings.get("token"):
            self.embed = nn.Linear(3, config.text_config.hidden_size)

    @classmethod
    def image_tokens(cls, settings: dict, grid: int) -> int:
        return 1 if settings.get("token") else 0

    @classmethod
    def collate(cls, settings: dict, grid: int, metas: list[dict]) -> dict[str, torch.Tensor]:
        return {"colour": torch.tensor([COLOURS[meta["caption"].split()[1]] for meta in metas]) / 255}

    @classmethod
    def vision_stem(cls, name: str, vision_config) -> nn.Module:
        if name != "pooled":
            raise ValueError(f"mean_colour has no stem {name!r}")
        return PooledStem(vision_config.patch_size, vision_config.hidden_size)

    def part_of(self, name: str) -> str:
        return "connector" if name == "embed" else "vision_tower"

    def guess(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(1))

    def loss(self, model, features, targets, pixel_values):
        return nn.functional.mse_loss(self.guess(features).float(), targets["colour"].float()) if "colour" in targets else None

    def image_embeddings(self, model, features, targets=None):
        return self.embed(self.guess(features))[:, None] if self.settings.get("token") else None


class PooledStem(nn.Sequential):
    """A toy stem: each patch's mean colour, projected to the encoder's width."""

    def __init__(self, patch_size: int, hidden_size: int):
        super().__init__(nn.AvgPool2d(patch_size), nn.Conv2d(3, hidden_size, 1))

    @property
    def weight(self) -> torch.Tensor:
        return self[1].weight

    def flops(self, image_size: int) -> float:
        return 3 * 2 * 3 * self[1].out_channels * (image_size // self[0].kernel_size) ** 2


def train_in_process(monkeypatch, **config) -> list[dict]:
    """The real trainer as one process (gloo), so it sees the extension this module registered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in one.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(**config))
    finally:
        torch.set_num_threads(threads)
    return read_metrics(Path(config["output_dir"]) / "metrics.jsonl")


def test_a_toy_extension_trains_through_the_trainer_and_reloads_with_identical_logits(tmp_path, parts, monkeypatch):
    shards = write_toy_shards(tmp_path / "shards", samples=64, per_shard=32, text_every=4)
    base = {
        "shards": str(shards),
        "vision_model": parts["siglip"],
        "text_model": parts["llama"],
        "batch_size": 8,
        "lr": 3e-3,
        "max_length": 128,
        "warmup_steps": 2,
        "save_every": 100,
        "workers": 0,
        "max_steps": 12,
    }
    encoder = train_in_process(
        monkeypatch, **base, output_dir=str(tmp_path / "encoder"), stage="encoder", extensions={"mean_colour": {"token": True}}
    )
    assert all(r["loss"] == r["extension_loss"] and r["tokens_per_s"] == 0 for r in encoder)  # the LLM never ran
    assert sum(r["loss"] for r in encoder[-3:]) < sum(r["loss"] for r in encoder[:3]) / 2
    finetune = train_in_process(
        monkeypatch,
        **base,
        output_dir=str(tmp_path / "finetune"),
        text_fraction=0.25,
        init_from=str(tmp_path / "encoder" / "final"),
        extensions={"mean_colour": {"weight": 0.5}},
    )
    assert all(("extension_loss" in r) == (r["modality"] == "image") for r in finetune) and any(r["modality"] == "text" for r in finetune)

    first, final = (BeniForConditionalGeneration.from_pretrained(tmp_path / stage / "final") for stage in ("encoder", "finetune"))
    assert final.config.extensions == {"mean_colour": {"token": True}}  # the trainer's weight stays out of the model
    assert final.config.num_image_tokens() == 16 + 1
    toy = final.extensions["mean_colour"]
    # The head follows the vision tower (trained in both stages), the token's embedding the connector (finetune only).
    torch.manual_seed(0)  # as the trainer builds a new model
    config = BeniConfig(vision_model=parts["siglip"], text_model=parts["llama"], extensions={"mean_colour": {"token": True}})
    start = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"])).extensions["mean_colour"]
    heads, embeds = ([getattr(m, part).weight for m in (start, first.extensions["mean_colour"], toy)] for part in ("head", "embed"))
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    assert torch.equal(embeds[0], embeds[1]) and not torch.equal(embeds[1], embeds[2])

    processor = load_processor(tmp_path / "finetune" / "final")
    assert processor.num_image_tokens == final.config.num_image_tokens()
    settings = DataSettings(str(shards), batch_size=8, image_size=32, max_length=128)
    batch = next(iter(make_loader(settings, processor, 0, 1, DataPosition(), workers=0, pin_memory=False)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    inputs["pixel_values"] = DevicePixels(processor.image_processor, torch.device("cpu"))(batch["pixel_values"])
    final.save_pretrained(tmp_path / "again")
    reloaded = BeniForConditionalGeneration.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        logits = final.eval()(**inputs).logits
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, logits, rtol=0, atol=0)
        toy.embed.weight.zero_()  # the extension's token reaches the LLM
        assert not torch.equal(final(**inputs).logits, logits)


def test_a_model_without_extensions_saves_no_extension_fields_or_weights(build, tmp_path):
    model, _ = build()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["extensions"] == {} and not [k for k in config if "reading" in k or "ocr" in k]
    weights = load_file(tmp_path / "model.safetensors")
    assert not [k for k in weights if k.startswith("extensions.")] and any(k.startswith("vision_tower.") for k in weights)
    with pytest.raises(ValueError, match=r"Unknown extension 'colour_head': use one of \[.*'ocr'.*\] or 'package.module:Class'"):
        BeniConfig(**{**model.config.to_dict(), "extensions": {"colour_head": {}}})


def test_an_extensions_vision_stem_replaces_the_patchify_counts_its_flops_and_reloads(parts, tmp_path):
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    config = BeniConfig(vision_config=vision, text_model=parts["llama"], vision_stem="mean_colour.pooled", extensions={"mean_colour": {}})
    model = BeniForConditionalGeneration.from_parts(config, load_tokenizer(parts["llama"], config.image_token)).eval()
    assert isinstance(model.vision_tower.stem(), PooledStem)
    assert stem_flops(model.config) == model.vision_tower.stem().flops(32) == 3 * 2 * 3 * 32 * 16
    model.save_pretrained(tmp_path)
    loaded = BeniForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.vision_tower(pixels), model.vision_tower(pixels))
    with pytest.raises(ValueError, match="mean_colour has no stem 'square'"):
        BeniConfig(vision_config=vision, text_model=parts["llama"], vision_stem="mean_colour.square", extensions={"mean_colour": {}})
