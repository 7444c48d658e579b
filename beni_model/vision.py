"""The vision tower: any transformers image encoder that maps pixel_values to hidden states."""

import inspect
import math
import string

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from beni_model.config import BeniConfig

READING_ALPHABET = string.printable[:95]  # digits, letters, punctuation, space: what the reading head emits
READS_PER_COLUMN = 2  # a column of 16 px patches may hold more than one narrow glyph


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

    @property
    def weight(self) -> torch.Tensor:  # encoders read the patch embedding's dtype from its weight
        return self[-1].weight


def stem_channels(patch_size: int) -> list[int]:
    return [3] + [32 * 2**i for i in range(patch_size.bit_length() - 1)]


def conv_stem_flops(patch_size: int, hidden_size: int, image_size: int) -> float:
    """A ConvStem's forward FLOPs for one image (2 per multiply-add)."""
    channels = stem_channels(patch_size)
    convs = sum(2 * 9 * c_in * c_out * (image_size >> i) ** 2 for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])))
    return convs + 2 * channels[-1] * hidden_size * (image_size // patch_size) ** 2


def vision_encoder_from_config(vision_config: PretrainedConfig, stem: str | None = None) -> PreTrainedModel:
    """A randomly initialised encoder; `stem="conv"` swaps its linear patchify for a `ConvStem`."""
    encoder = AutoModel.from_config(vision_config)
    if stem == "conv":
        embeddings = getattr(encoder, "embeddings", None) or getattr(getattr(encoder, "vision_model", None), "embeddings", None)
        if not isinstance(getattr(embeddings, "patch_embedding", None), nn.Conv2d):
            raise ValueError(f"vision_stem='conv' replaces a CLIP/SigLIP-style patch_embedding, which {type(encoder).__name__} lacks.")
        embeddings.patch_embedding = ConvStem(vision_config.patch_size, vision_config.hidden_size)
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
        if config.reading_head:
            self.reading_head = nn.Linear(config.vision_config.hidden_size, READS_PER_COLUMN * (1 + len(READING_ALPHABET)))

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

    def reading_scores(self, features: torch.Tensor) -> torch.Tensor:
        """The reading head's logits, [batch, columns * READS_PER_COLUMN, 1 + len(READING_ALPHABET)], left to right."""
        patches = features[:, self.num_prefix_tokens :]
        batch, n, dim = patches.shape
        grid = math.isqrt(n)
        return self.reading_head(patches.reshape(batch, grid, grid, dim).mean(1)).view(batch, grid * READS_PER_COLUMN, -1)

    def read(self, pixel_values: torch.Tensor) -> list[str]:
        """The reading head's greedy transcript of each image: repeats merged, blanks dropped."""
        reads = []
        for row in self.reading_scores(self(pixel_values)).argmax(-1).tolist():
            reads.append("".join(READING_ALPHABET[k - 1] for i, k in enumerate(row) if k and (i == 0 or k != row[i - 1])))
        return reads

    def reading_loss(self, features: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CTC loss of the reading head, as text recognisers train: each column of the patch grid (the mean of its
        rows) reads READS_PER_COLUMN characters or blanks, left to right. `targets` holds the class ids
        (`reading_classes`) of every image with `lengths` > 0, concatenated; images of length 0 have no transcript, and
        lines longer than the head's reads are left out.
        The loss (mean per character) ties each character to its place in the line, which the LLM's answer loss
        alone does not teach an encoder trained from scratch (bench/BENCHMARKS.md)."""
        scores = self.reading_scores(features)
        keep = (lengths > 0) & (lengths <= scores.shape[1])  # a longer line cannot be read in this many steps
        rows = keep.nonzero().squeeze(1)
        if len(rows) == 0:
            return scores.sum() * 0  # a zero loss that still gives the head a gradient, as FSDP wants of every rank
        targets = targets.to(keep.device)[keep.repeat_interleave(lengths)]
        # Host tensors go over without a blocking copy, which would stall the host until the GPU catches up.
        log_probs = scores[rows.to(scores.device, non_blocking=True)].float().log_softmax(-1).transpose(0, 1)
        steps = torch.full((len(rows),), log_probs.shape[0], dtype=torch.long)
        targets = targets.to(scores.device, non_blocking=True)
        return nn.functional.ctc_loss(log_probs, targets, steps, lengths[rows].cpu(), zero_infinity=True)


def reading_classes(transcript: str | None) -> list[int]:
    """The reading head's class ids for a transcript (0 is CTC's blank); empty where there is none or a character
    lies outside READING_ALPHABET."""
    if not transcript or any(c not in READING_ALPHABET for c in transcript):
        return []
    return [1 + READING_ALPHABET.index(c) for c in transcript]
