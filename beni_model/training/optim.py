"""The optimizer and its schedule: AdamW groups per part (their own learning rates) and warmup then cosine."""

import math

from torch import nn

from beni_model.training.config import PARTS, TrainConfig
from beni_model.training.model import beni_of


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups per part (its lr from part_lr, else lr) and per kind: no weight decay on biases and norms."""
    groups = []
    for part in PARTS:
        params = [p for p in beni_of(model).part_parameters(part) if p.requires_grad]
        lr = config.part_lr.get(part, config.lr)
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": config.weight_decay if decay else 0.0})
    return groups


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
