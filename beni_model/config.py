"""BeniConfig: a vision encoder, a connector and a causal LLM, checked when the config is made."""

import difflib
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from beni_model.connectors import ConnectorSpec, parse_connector
from beni_model.extensions import extension_class

# Encoders that put a CLS token before the patch tokens (DINOv2 with registers adds its register tokens).
_CLS_ENCODERS = {"clip_vision_model", "dinov2", "dinov2_with_registers", "vit", "deit"}


def _resolve_vision_config(vision_model: str) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(vision_model)
    # A full CLIP/SigLIP checkpoint holds a text tower too: keep its vision half.
    return getattr(config, "vision_config", None) or config


class BeniConfig(PretrainedConfig):
    """`vision_model` / `text_model` name where pretrained weights come from (hub id or local folder) when a model
    is built with `BeniForConditionalGeneration.from_parts`; the nested `vision_config` / `text_config` are
    resolved from them here and saved, so a saved beni folder reloads offline without the original paths.
    Without `vision_model`, the vision tower is trained from scratch from `vision_config`.
    """

    model_type = "beni"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_model: str | None = None
    text_model: str | None = None
    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    connector: str = "mlp2x_gelu"
    # A stem replaces the encoder's patchify, from scratch only: "conv" (vision.ConvStem) or an extension's,
    # "<extension>.<stem>" (vision.build_stem; "ocr.pplcnet": beni_model.ocr.stem).
    vision_stem: str | None = None
    vision_feature_layer: int = -1
    keep_cls: bool = False
    extensions: dict[str, dict] | None = None  # extension name -> its own settings (beni_model.extensions)
    image_size: int | None = None  # None: the encoder's own; larger sizes interpolate its position embeddings
    image_token: str = "<image>"
    image_token_id: int | None = None  # set by chat.load_tokenizer's token when the model is built
    # A user turn's images (with their extensions' tokens) after its text, wherever the prompt puts them: what the LLM
    # copies from an image then sits a fixed distance before the answer, whatever the question's length
    images_last: bool = False
    freeze_vision: bool = False
    freeze_connector: bool = False
    freeze_text: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        fields = [name for name in BeniConfig.__annotations__ if not name.startswith("_")]
        for key in kwargs:  # unknown keys are kept as attributes (transformers' own and quantizers' among them)
            if close := difflib.get_close_matches(key, fields, n=1, cutoff=0.8):
                raise ValueError(f"BeniConfig has no setting {key!r}: did you mean {close[0]!r}?")
        for name in ("vision_config", "text_config"):
            if isinstance(getattr(self, name), dict) and "model_type" not in getattr(self, name):
                raise ValueError(f"{name} has no model_type: name its family, e.g. {{'model_type': 'siglip_vision_model', ...}}.")
        if self.vision_config is None and self.vision_model:
            self.vision_config = _resolve_vision_config(self.vision_model)
        if self.text_config is None and self.text_model:
            self.text_config = AutoConfig.from_pretrained(self.text_model)
        super().__post_init__(**kwargs)
        for field in ("image_size", "patch_size", "hidden_size"):
            if getattr(self.vision_config, field, None) is None:
                raise ValueError(
                    f"Vision config {self.vision_config.model_type!r} has no {field}: beni needs a ViT-like encoder that maps square "
                    "pixel_values to a fixed patch grid (SigLIP, CLIP, DINOv2, ViT; SigLIP2's NaFlex encoder takes patch sequences)."
                )
        # Tying lives in the LLM; mirror it so transformers' checks on the composite config agree.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.image_size = self.image_size or self.vision_config.image_size
        self.extensions = dict(self.extensions or {})
        self.validate_parts()

    @property
    def connector_spec(self) -> ConnectorSpec:
        return parse_connector(self.connector)

    @property
    def patch_size(self) -> int:
        return self.vision_config.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """CLS (and register) tokens the encoder emits before its patch tokens."""
        if self.vision_config.model_type not in _CLS_ENCODERS:
            return 0
        return 1 + getattr(self.vision_config, "num_register_tokens", 0)

    def num_image_tokens(self, image_size: int | None = None) -> int:
        """LLM positions one image takes at `image_size` (default: the configured size)."""
        grid = (image_size or self.image_size) // self.patch_size
        prefix = self.num_prefix_tokens if self.keep_cls else 0
        tokens = self.connector_spec.num_tokens(grid * grid + prefix)
        return tokens + sum(extension_class(name).image_tokens(settings, grid) for name, settings in self.extensions.items())

    def validate_parts(self) -> None:
        spec = parse_connector(self.connector)
        vision, text = self.vision_config, self.text_config
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the encoder's patch size {self.patch_size}: pick a multiple."
            )
        if self.vision_stem is not None:
            extension, dot, stem = self.vision_stem.rpartition(".")
            if self.vision_stem != "conv" and not (dot and extension in self.extensions):
                raise ValueError(
                    f"vision_stem {self.vision_stem!r} is unknown: use 'conv', an extension's stem named '<extension>.<stem>' "
                    "(e.g. 'ocr.pplcnet', with that extension in extensions), or leave it unset."
                )
            if self.vision_model:
                raise ValueError(
                    f"vision_stem={self.vision_stem!r} is for an encoder trained from scratch; {self.vision_model!r} has its own patch embedding."
                )
            if dot:  # the extension's own checks of its stem, built where it costs nothing
                with torch.device("meta"):
                    extension_class(extension).vision_stem(stem, self.vision_config)
            if self.vision_stem == "conv" and self.patch_size & (self.patch_size - 1):
                raise ValueError(
                    f"vision_stem='conv' halves the image per block: the patch size must be a power of two, not {self.patch_size}."
                )
        for name, settings in self.extensions.items():
            extension_class(name).check(settings, self)
        layers = vision.num_hidden_layers
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} is out of range for an encoder with {layers} layers (use -1 for the last)."
            )
        if spec.kind == "pixelshuffle":
            grid = self.image_size // self.patch_size
            if self.keep_cls and self.num_prefix_tokens:
                raise ValueError(f"Connector {self.connector!r} shuffles a square patch grid: set keep_cls=False.")
            if grid % spec.shuffle_factor:
                raise ValueError(
                    f"Connector {self.connector!r} needs the {grid}x{grid} patch grid divisible by {spec.shuffle_factor}: change image_size or the factor."
                )
        if spec.kind == "perceiver":
            heads, kv_heads = spec.perceiver_heads(text.hidden_size)
            if text.hidden_size % heads or heads % kv_heads:
                raise ValueError(
                    f"Connector {self.connector!r}: {heads} heads must divide the LLM width {text.hidden_size} and {kv_heads} kv heads must divide {heads}."
                )

    def to_dict(self) -> dict:
        """Local folders the parts came from are left out: the nested configs hold what they gave, and a saved model
        moves to other machines. Hub ids stay, to say where the weights came from."""
        output = super().to_dict()
        for part in (output, output.get("vision_config"), output.get("text_config")):
            for key in ("vision_model", "text_model", "_name_or_path"):
                if isinstance(part, dict) and part.get(key) and Path(part[key]).exists():
                    part[key] = None if key != "_name_or_path" else ""
        return output


AutoConfig.register("beni", BeniConfig)

# The model and processor register their Auto classes when imported: any beni_model module that names the config
# registers all three (a bare `import beni_model` stays light for the data-prep processes).
import beni_model.modeling  # noqa: E402, F401
import beni_model.processing  # noqa: E402, F401
