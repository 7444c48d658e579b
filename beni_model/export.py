"""Export to transformers' own LlavaForConditionalGeneration layout (CLIP/SigLIP encoder + 2-layer MLP)."""

from pathlib import Path

from transformers import LlavaConfig, LlavaForConditionalGeneration

from beni_model.extensions import extension_class
from beni_model.modeling import BeniForConditionalGeneration

LLAVA_ENCODERS = {"clip_vision_model", "siglip_vision_model"}


def llava_config(model: BeniForConditionalGeneration) -> LlavaConfig:
    config, spec = model.config, model.config.connector_spec
    if config.vision_config.model_type not in LLAVA_ENCODERS:
        raise ValueError(f"LLaVA export needs a CLIP or SigLIP vision tower, not {config.vision_config.model_type!r}.")
    if config.vision_stem:
        raise ValueError(f"LLaVA export needs the encoder's own patch embedding; this model has vision_stem={config.vision_stem!r}.")
    grid = config.image_size // config.patch_size
    if adding := [name for name, settings in config.extensions.items() if extension_class(name).image_tokens(settings, grid)]:
        raise ValueError(f"LLaVA export has no place for the image tokens that the extensions {adding} add; export a model without them.")
    if (spec.kind, spec.mlp_depth) != ("mlp", 2):
        raise ValueError(f"LLaVA export needs the mlp2x connector, not {config.connector!r}.")
    if config.image_size != config.vision_config.image_size:
        raise ValueError(
            f"LLaVA does not interpolate position embeddings: export needs image_size {config.vision_config.image_size}, not {config.image_size}."
        )
    if model.language_model.base_model_prefix != "model":
        raise ValueError(f"LLaVA export needs an LLM laid out as `model` + `lm_head`, not {type(model.language_model).__name__}.")
    # LLaVA's "default" strategy drops exactly the first token: right for CLIP's CLS, wrong for SigLIP.
    drops_cls = config.num_prefix_tokens == 1 and not config.keep_cls
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.num_image_tokens(),
        projector_hidden_act=spec.act,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="default" if drops_cls else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def llava_state_dict(model: BeniForConditionalGeneration) -> dict:
    renames = {
        "vision_tower.encoder.": "model.vision_tower.",
        "connector.mlp.0.": "model.multi_modal_projector.linear_1.",
        "connector.mlp.2.": "model.multi_modal_projector.linear_2.",
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
    }
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("extensions."):
            continue  # extensions that add no image tokens are training aids or heads of their own: LLaVA's answers never use them
        prefix = next(p for p in renames if name.startswith(p))
        state[renames[prefix] + name[len(prefix) :]] = tensor
    return state


def export_llava(model: BeniForConditionalGeneration, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a folder that `LlavaForConditionalGeneration.from_pretrained` loads with the same weights."""
    llava = LlavaForConditionalGeneration(llava_config(model)).to(model.dtype)
    missing, unexpected = llava.load_state_dict(llava_state_dict(model), strict=False)
    missing = set(missing) - set(llava.all_tied_weights_keys)
    if missing or unexpected:
        raise RuntimeError(f"LLaVA layout mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    llava.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
