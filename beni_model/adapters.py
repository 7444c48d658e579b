"""PEFT adapters: LoRA / DoRA on the LLM (optionally the vision tower), the connector trained in full."""

import re

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from beni_model.modeling import BeniForConditionalGeneration


def lora_targets(model: BeniForConditionalGeneration, vision: bool) -> list[str]:
    """Every linear layer of the LLM's blocks (not its output head), plus, when asked, those of the encoder layers
    whose output the model reads: not the layers after `vision_feature_layer`, nor a pooling head (SigLIP's), whose
    adapters would never get a gradient."""
    head = model.get_output_embeddings()
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]
    targets = [name for name, _ in linears if name.startswith("language_model.")]
    if vision:
        layers = model.config.vision_config.num_hidden_layers
        used = model.config.vision_feature_layer % (layers + 1)  # hidden_states[k] is the output of the first k layers
        for name, _ in linears:
            block = re.search(r"\.layers?\.(\d+)\.", name)
            if name.startswith("vision_tower.") and block and int(block[1]) < used:
                targets.append(name)
    return targets


def add_lora(
    model: BeniForConditionalGeneration,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    dora: bool = False,
    vision: bool = False,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Wrap the model for adapter training. A 4-bit LLM (from_parts(load_in_4bit=True)) gets QLoRA's preparation."""
    if getattr(model.language_model, "is_loaded_in_4bit", False):
        prepare_model_for_kbit_training(model.language_model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # Frozen embeddings feed the adapters; their outputs need grads for checkpointed blocks to backpropagate.
    model.enable_input_require_grads()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_dora=dora,
        target_modules=lora_targets(model, vision),
        modules_to_save=["connector"],
    )
    return get_peft_model(model, config)
