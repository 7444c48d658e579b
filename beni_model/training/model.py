"""The model a stage trains: built from the parts or an earlier stage, its parts frozen as the stage says."""

import torch
from torch import nn

from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.training.config import PARTS, TrainConfig


def build_model(config: TrainConfig, tokenizer) -> nn.Module:
    torch.manual_seed(config.seed)  # every rank starts from the same weights
    if config.init_from:
        model = BeniForConditionalGeneration.from_pretrained(config.init_from)
    else:
        beni_config = BeniConfig(
            vision_model=config.vision_model,
            vision_config=config.vision_config,
            text_model=config.text_model,
            connector=config.connector,
            vision_stem=config.vision_stem,
            image_size=config.image_size,
            images_last=config.images_last,
            extensions=config.model_extensions,
        )
        model = BeniForConditionalGeneration.from_parts(beni_config, tokenizer)
    if missing := set(config.extensions) - set(model.config.extensions):
        raise ValueError(
            f"This stage names extensions {sorted(missing)} that the model in {config.init_from} lacks: add them in its first stage."
        )
    trained = {"encoder": ("vision_tower",), "align": ("connector",)}.get(config.stage, config.train_parts)
    for part in PARTS:
        for param in model.part_parameters(part):
            param.requires_grad_(part in trained and not config.lora_rank)
    if config.lora_rank:
        from beni_model.adapters import add_lora  # peft (and bitsandbytes) take seconds to import

        return add_lora(model, rank=config.lora_rank, gradient_checkpointing=config.activation_checkpointing)
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def beni_of(model: nn.Module) -> BeniForConditionalGeneration:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
