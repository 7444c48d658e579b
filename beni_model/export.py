"""Export to transformers' own LlavaForConditionalGeneration layout (any encoder LLaVA's config takes, a 2-layer MLP),
with a LlavaProcessor that gives the beni processor's prompt ids and pixel values."""

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from beni_model.extensions import extension_class
from beni_model.modeling import BeniForConditionalGeneration

RENAMES = {
    "vision_tower.encoder.": "model.vision_tower.",
    "connector.mlp.0.": "model.multi_modal_projector.linear_1.",
    "connector.mlp.2.": "model.multi_modal_projector.linear_2.",
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
}


def select_strategy(config) -> str:
    """LLaVA's feature selection: "default" drops exactly the first token (a CLS), "full" keeps every token."""
    prefix = config.num_prefix_tokens
    if prefix > 1 and not config.keep_cls:
        raise ValueError(
            f"LLaVA drops at most one token before the patches, and {config.vision_config.model_type!r} puts {prefix} there (CLS and "
            "registers): export a model trained with keep_cls=True or with an encoder that has at most a CLS token."
        )
    return "default" if prefix == 1 and not config.keep_cls else "full"


def llava_config(model: BeniForConditionalGeneration) -> LlavaConfig:
    config, spec = model.config, model.config.connector_spec
    if config.vision_stem:
        raise ValueError(f"LLaVA export needs the encoder's own patch embedding; this model has vision_stem={config.vision_stem!r}.")
    grid = config.image_size // config.patch_size
    if adding := [name for name, settings in config.extensions.items() if extension_class(name).image_tokens(settings, grid)]:
        raise ValueError(f"LLaVA export has no place for the image tokens that the extensions {adding} add; export a model without them.")
    # An extension reads text from each image where read_images, given no images, gives a list and not None.
    if reading := [name for name, settings in config.extensions.items() if extension_class(name).read_images(settings, []) is not None]:
        raise ValueError(
            f"LLaVA's processor has no place for the text that the extensions {reading} read from each image; export a model without them."
        )
    if (spec.kind, spec.mlp_depth) != ("mlp", 2):
        raise ValueError(f"LLaVA export needs the mlp2x connector, not {config.connector!r}.")
    if config.image_size != config.vision_config.image_size:
        raise ValueError(
            f"LLaVA does not interpolate position embeddings: export needs image_size {config.vision_config.image_size}, not {config.image_size}."
        )
    if model.language_model.base_model_prefix != "model":
        raise ValueError(f"LLaVA export needs an LLM laid out as `model` + `lm_head`, not {type(model.language_model).__name__}.")
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.num_image_tokens(),
        projector_hidden_act=spec.act,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=select_strategy(config),
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def llava_state_dict(model: BeniForConditionalGeneration) -> dict:
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("extensions."):
            continue  # extensions that add no image tokens are training aids or heads of their own: LLaVA's answers never use them
        prefix = next((p for p in RENAMES if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(
                f"The weight {name!r} has no place in LLaVA's layout (vision tower, 2-layer projector, LLM): it cannot be exported."
            )
        state[RENAMES[prefix] + name[len(prefix) :]] = tensor
    return state


def llava_processor(model: BeniForConditionalGeneration, processor) -> LlavaProcessor:
    """The beni processor's image processor, tokenizer and chat template, with LLaVA's image-token count rule set to
    give the same count: the patches, plus the prefix tokens that the model keeps."""
    config = model.config
    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy=select_strategy(config),
        chat_template=processor.chat_template,
        image_token=config.image_token,
        num_additional_image_tokens=config.num_prefix_tokens,
    )


def export_llava(model: BeniForConditionalGeneration, out_dir: str | Path, processor=None) -> Path:
    """Write a folder that `LlavaForConditionalGeneration.from_pretrained` loads with the same weights, and with
    `processor` (the model's BeniProcessor) a LlavaProcessor that AutoProcessor loads."""
    config = llava_config(model)
    with torch.device("meta"):  # every weight comes from the beni model: nothing to initialise
        llava = LlavaForConditionalGeneration(config)
    missing, unexpected = llava.load_state_dict(llava_state_dict(model), strict=False, assign=True)
    llava.tie_weights()
    llava.generation_config.suppress_tokens = model.generation_config.suppress_tokens  # the image token, never generated
    missing = set(missing) - set(llava.all_tied_weights_keys)
    if missing or unexpected:
        raise RuntimeError(f"LLaVA layout mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    llava.save_pretrained(out_dir)
    if processor is not None:
        llava_processor(model, processor).save_pretrained(out_dir)
    return Path(out_dir)
