"""The vision tower: any transformers image encoder that maps pixel_values to hidden states."""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from beni_model.extensions import extension_class

if TYPE_CHECKING:  # beni_model.config imports the model, which imports this module
    from beni_model.config import BeniConfig


class ConvStem(nn.Sequential):
    """A patch embedding that learns from scratch in few steps: per halving of the resolution a 3x3 conv,
    BatchNorm, ReLU and a 2x max-pool (channels 32, 64, ...), then a 1x1 conv to the encoder's width. A ViT's
    linear 16 px patchify sees a glyph moved by a few pixels as a new input; measured on one printed character
    per image (36 classes, 150 steps of 32 on a CPU), a 1-layer SigLIP ViT reached 12% held-out accuracy with
    its own patchify and 68% with this stem."""

    def __init__(self, patch_size: int, hidden_size: int):
        channels = stem_channels(patch_size)
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        super().__init__(*layers, nn.Conv2d(channels[-1], hidden_size, 1))
        self.patch_size = patch_size

    @property
    def weight(self) -> torch.Tensor:  # encoders read the patch embedding's dtype from its weight
        return self[-1].weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # its own code: torch.compile skips nn.Sequential's
        return super().forward(pixels)

    def flops(self, image_size: int) -> float:
        """Training FLOPs for one image (forward and backward: 3x the forward's; 2 per multiply-add)."""
        channels = stem_channels(self.patch_size)
        convs = sum(2 * 9 * c_in * c_out * (image_size >> i) ** 2 for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])))
        return 3 * (convs + 2 * channels[-1] * self[-1].out_channels * (image_size // self.patch_size) ** 2)


def stem_channels(patch_size: int) -> list[int]:
    return [3] + [32 * 2**i for i in range(patch_size.bit_length() - 1)]


def build_stem(name: str, vision_config: PretrainedConfig) -> nn.Module:
    """The patch embedding `BeniConfig.vision_stem` names: "conv" (ConvStem) or an extension's ("<extension>.<stem>",
    Extension.vision_stem). Each has `flops(image_size)`, its training FLOPs for one image."""
    if name == "conv":
        return ConvStem(vision_config.patch_size, vision_config.hidden_size)
    extension, _, stem = name.rpartition(".")
    return extension_class(extension).vision_stem(stem, vision_config)


def stem_flops(config: BeniConfig) -> float:
    """Training FLOPs of one image through the config's vision stem (0 without one)."""
    if not config.vision_stem:
        return 0.0
    with torch.device("meta"):
        return build_stem(config.vision_stem, config.vision_config).flops(config.image_size)


def embeddings_of(encoder: nn.Module) -> nn.Module | None:
    return getattr(encoder, "embeddings", None) or getattr(getattr(encoder, "vision_model", None), "embeddings", None)


def vision_encoder_from_config(vision_config: PretrainedConfig, stem: str | None = None) -> PreTrainedModel:
    """A randomly initialised encoder; `stem` (BeniConfig.vision_stem) swaps its linear patchify for `build_stem`'s."""
    encoder = AutoModel.from_config(vision_config)
    if stem:
        embeddings = embeddings_of(encoder)
        if not isinstance(getattr(embeddings, "patch_embedding", None), nn.Conv2d):
            raise ValueError(f"vision_stem={stem!r} replaces a CLIP/SigLIP-style patch_embedding, which {type(encoder).__name__} lacks.")
        embeddings.patch_embedding = build_stem(stem, vision_config)
    return encoder


def vision_encoder_from_pretrained(vision_model: str, vision_config: PretrainedConfig, **kwargs) -> PreTrainedModel:
    # The class comes from the (vision) config, so a full CLIP/SigLIP checkpoint loads as its vision model only.
    encoder_class = AutoModel._model_mapping[type(vision_config)]
    return encoder_class.from_pretrained(vision_model, config=vision_config, **kwargs)


class VisionTower(nn.Module):
    """Runs the encoder, picks `vision_feature_layer`, drops the CLS/register tokens unless `keep_cls`."""

    def __init__(self, config: BeniConfig, encoder: PreTrainedModel):
        super().__init__()
        self.encoder = encoder
        self.feature_layer = config.vision_feature_layer
        self.keep_cls = config.keep_cls
        self.patch_size = config.patch_size
        self.native_size = config.vision_config.image_size
        self.takes_interpolate_flag = "interpolate_pos_encoding" in inspect.signature(encoder.forward).parameters
        self.num_prefix_tokens = config.num_prefix_tokens if config.keep_cls else 0

    def stem(self) -> nn.Module | None:
        """The vision stem (BeniConfig.vision_stem), None where the encoder keeps its own patchify."""
        patchify = getattr(embeddings_of(self.encoder), "patch_embedding", None)
        return None if patchify is None or isinstance(patchify, nn.Conv2d) else patchify

    def compile_stem(self) -> None:
        """torch.compile a vision stem, as the trainer compiles the transformer blocks: eager, the conv stem's
        BatchNorms, ReLUs and pools were 18 of the encoder step's 46 GPU ms, compiled the step's GPU time is 38 ms
        (bench/BENCHMARKS.md)."""
        if (stem := self.stem()) is not None:
            stem.compile()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        kwargs = {}
        if (height, width) != (self.native_size, self.native_size) and self.takes_interpolate_flag:
            kwargs["interpolate_pos_encoding"] = True  # encoders without the flag (DINOv2) always interpolate
        dtype = next(self.encoder.parameters()).dtype
        outputs = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **kwargs)
        features = outputs.hidden_states[self.feature_layer]
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        if self.keep_cls:
            return features
        return features[:, features.shape[1] - num_patches :]

    def patch_grid(self, features: torch.Tensor) -> torch.Tensor:
        """The patch tokens of `forward`'s output as a square grid, [batch, rows, columns, dim]."""
        patches = features[:, self.num_prefix_tokens :]
        batch, n, dim = patches.shape
        grid = math.isqrt(n)
        return patches.reshape(batch, grid, grid, dim)
