"""The vision tower: any transformers image encoder that maps pixel_values to hidden states."""

import inspect

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from beni_model.config import BeniConfig


def vision_encoder_from_config(vision_config: PretrainedConfig) -> PreTrainedModel:
    return AutoModel.from_config(vision_config)


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
