"""BeniForConditionalGeneration: vision tower -> connector -> causal LLM, with image features spliced in
wherever the image token stands in the prompt."""

import copy
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from beni_model.config import BeniConfig
from beni_model.connectors import build_connector
from beni_model.extensions import extension_class
from beni_model.vision import VisionTower, vision_encoder_from_config, vision_encoder_from_pretrained


@dataclass
class BeniOutput(CausalLMOutputWithPast):
    extension_losses: dict[str, torch.FloatTensor] | None = None  # each extension's loss, where the batch has its targets


# Written beside a saved model's config.json and named by its auto_map, so transformers' Auto classes load the folder
# (with trust_remote_code=True) without an import of beni first: the classes come from the installed beni_model.
AUTO_MODULE = "beni_hf"
AUTO_MAP = {
    "AutoConfig": f"{AUTO_MODULE}.BeniConfig",
    "AutoModelForImageTextToText": f"{AUTO_MODULE}.BeniForConditionalGeneration",
    "AutoProcessor": f"{AUTO_MODULE}.BeniProcessor",
}
AUTO_SOURCE = """\"\"\"transformers' Auto classes load this folder through beni_model (pip install beni).\"\"\"

from beni_model.config import BeniConfig  # noqa: F401
from beni_model.modeling import BeniForConditionalGeneration  # noqa: F401
from beni_model.processing import BeniProcessor  # noqa: F401
"""


def write_auto_module(folder: str | Path) -> None:
    (Path(folder) / f"{AUTO_MODULE}.py").write_text(AUTO_SOURCE)


class BeniForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = BeniConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: BeniConfig, vision_encoder: nn.Module | None = None, language_model: nn.Module | None = None):
        """`vision_encoder` / `language_model`: parts already built (from_parts loads them), else built from the
        nested configs."""
        if config.image_token_id is None:
            raise ValueError(
                "BeniConfig.image_token_id is not set: build a new model with BeniForConditionalGeneration.from_parts(config, tokenizer), "
                "which adds the image token, or set image_token_id to the tokenizer's image token id."
            )
        super().__init__(config)
        encoder = vision_encoder if vision_encoder is not None else vision_encoder_from_config(config.vision_config, config.vision_stem)
        self.vision_tower = VisionTower(config, encoder)
        # Built right after the vision tower: a seed initialises the same weights as when the heads lived in it.
        self.extensions = nn.ModuleDict({name: extension_class(name)(config, settings) for name, settings in config.extensions.items()})
        self.connector = build_connector(config.connector_spec, config.vision_config.hidden_size, config.text_config.hidden_size)
        self.language_model = language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        self.apply_freeze_flags()
        # The image token stands for an image's features: generated, the next step would feed the LLM a placeholder.
        self.generation_config.suppress_tokens = [config.image_token_id]

    @classmethod
    def from_parts(cls, config: BeniConfig, tokenizer, dtype: torch.dtype | None = None, load_in_4bit: bool = False):
        """Build a new model from pretrained parts: the encoder from `config.vision_model` and the LLM from
        `config.text_model` where given (else random init from the nested configs), a fresh connector, and the
        LLM's embeddings grown to hold `tokenizer`'s image token (see `chat.load_tokenizer`). The parts are loaded
        first and handed to the model, so no random tower is built to be thrown away; `config` is left as it was
        (the model's is a copy).

        `load_in_4bit` loads the LLM as NF4 through bitsandbytes for QLoRA (needs a CUDA GPU).
        """
        config = copy.deepcopy(config)
        image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {config.image_token!r} token: load it with beni_model.chat.load_tokenizer.")
        if load_in_4bit and not torch.cuda.is_available():
            raise RuntimeError("load_in_4bit (QLoRA) needs a CUDA GPU; train in bf16 or with plain LoRA on this machine.")
        config.extensions = {name: extension_class(name).prepare(settings, tokenizer) for name, settings in config.extensions.items()}
        config.image_token_id = image_token_id
        if config.vision_model:
            encoder = vision_encoder_from_pretrained(config.vision_model, config.vision_config)
        else:
            encoder = vision_encoder_from_config(config.vision_config, config.vision_stem)
        language_model = AutoModelForCausalLM.from_config(config.text_config) if not config.text_model else None
        if config.text_model:
            quantization = None
            if load_in_4bit:
                # Storage dtype equal to the compute dtype so FSDP sees one dtype per flat shard.
                quantization = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16,
                    bnb_4bit_quant_storage=torch.bfloat16,
                )
            language_model = AutoModelForCausalLM.from_pretrained(
                config.text_model,
                config=config.text_config,
                dtype=dtype,
                quantization_config=quantization,
                device_map={"": 0} if load_in_4bit else None,
            )
        if len(tokenizer) > language_model.get_input_embeddings().num_embeddings:
            language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        config.text_config = language_model.config
        model = cls(config, vision_encoder=encoder, language_model=language_model)
        for extension in model.extensions.values():
            extension.start(model)
        if dtype is not None:
            for part in (model.vision_tower, model.connector, model.extensions):
                part.to(dtype)
            if not load_in_4bit:
                model.language_model.to(dtype)
        if load_in_4bit:
            for part in (model.vision_tower, model.connector, model.extensions):
                part.cuda()
        model.apply_freeze_flags()
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) with output_loading_info=True
        model.apply_freeze_flags()  # loading swaps in fresh Parameters, which require grad
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the module that the config's auto_map names (see AUTO_MAP)."""
        self.config.auto_map = AUTO_MAP
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_auto_module(save_directory)

    def apply_freeze_flags(self) -> None:
        for part, frozen in (
            ("vision_tower", self.config.freeze_vision),
            ("connector", self.config.freeze_connector),
            ("language_model", self.config.freeze_text),
        ):
            for param in self.part_parameters(part):
                param.requires_grad_(not frozen and param.is_floating_point())  # quantized weights never train

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """A core part's parameters and the extensions' that follow it (Extension.part_of)."""
        params = list(getattr(self, part).parameters())
        for extension in self.extensions.values():
            params += [p for name, p in extension.named_parameters() if extension.part_of(name.split(".")[0]) == part]
        return params

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def embed(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written over the image-token positions.

        `pixel_values` holds the batch's images in reading order: sample 0's images first, each sample's in the
        order its image tokens appear; text-only samples contribute none.
        """
        return self.merge(input_ids, self.vision_features(pixel_values))

    def vision_features(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """The vision tower's output for the batch's images; None for a batch without images."""
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values are {list(pixel_values.shape)} but this model takes [images, 3, {size}, {size}]: preprocess the "
                "images with the model's processor (AutoProcessor.from_pretrained on its folder)."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values are {pixel_values.dtype}, not the normalized floats this model takes: finish a training loader's "
                "images with beni_model.data.DevicePixels, or preprocess them with the model's processor."
            )
        features = self.vision_tower(pixel_values)
        for extension in self.extensions.values():
            features = extension.refine_features(self, pixel_values, features)
        return features

    def merge(
        self, input_ids: torch.LongTensor, vision_features: torch.Tensor | None, extension_targets: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`embed` from the vision tower's output for the batch's images (None: no images); `extension_targets`, where
        training has them, reach the extensions' `image_embeddings`."""
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        features = None
        if vision_features is not None:
            features = self.connector(vision_features)
            extra = [e.image_embeddings(self, vision_features, extension_targets) for e in self.extensions.values()]
            features = torch.cat([features, *(x.to(features.dtype) for x in extra if x is not None)], dim=1)
        images, per_image = features.shape[:2] if features is not None else (0, 0)
        if (self.training and input_ids.is_cuda) or torch.compiler.is_compiling():
            # Reading the count back would wait on the GPU at every training step (and break a compiled graph): the assert
            # runs on the device instead, and fails the step (where nonzero_static would cut the placeholders silently).
            torch._assert_async(image_mask.sum() == images * per_image, "The batch's image tokens do not match its images.")
        else:
            check_image_tokens(int(image_mask.sum()), images, per_image)
        if features is None:
            return embeds
        # Positions found with a known count and written by index: masked_scatter's backward (masked_select) waits on
        # the GPU for its output size.
        positions = torch.nonzero_static(image_mask.flatten(), size=features.shape[0] * features.shape[1]).squeeze(1)
        return embeds.flatten(0, 1).index_copy(0, positions, features.flatten(0, 1).to(embeds.dtype)).view_as(embeds)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        extension_targets: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ) -> "BeniOutput":
        """The LLM's output on the merged embeddings; given `extension_targets` (the loader's, see
        Extension.collate), also each extension's loss on the same vision features. Other keyword arguments go to the
        LLM (`cache`, `position_ids`, `logits_to_keep`, ...)."""
        losses = None
        if not torch.compiler.is_compiling():  # a compiled decode step is the same call each time
            check_names(frozenset(kwargs))
        if inputs_embeds is not None and pixel_values is not None:
            raise ValueError(
                "pixel_values were given with inputs_embeds, which already hold every position's embedding: pass input_ids with "
                "pixel_values, or merge the images into the embeddings first (model.embed)."
            )
        if inputs_embeds is None:
            features = self.vision_features(pixel_values)
            if extension_targets is not None and features is not None:
                losses = {name: e.loss(self, features, extension_targets, pixel_values) for name, e in self.extensions.items()}
                losses = {name: loss for name, loss in losses.items() if loss is not None} or None
            if input_ids is None:  # images and targets alone (the encoder stage): the extensions' losses, the LLM not run
                return BeniOutput(extension_losses=losses)
            inputs_embeds = self.merge(input_ids, features, extension_targets)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        return BeniOutput(**out, extension_losses=losses)

    @torch.no_grad()
    def extension_answers(self, pixel_values: torch.Tensor) -> list[str] | None:
        """The first extension's own answers for each image (Extension.answers), or None where none answers."""
        features = self.vision_features(pixel_values)
        for extension in self.extensions.values():
            if (answers := extension.answers(self, features)) is not None:
                return answers
        return None

    def prepare_inputs_for_generation(self, *args, pixel_values=None, is_first_iteration=False, **kwargs):
        """transformers' preparation, with the images on the first step only (or on every step without a cache): later
        steps feed new tokens alone, whose keys and values of the image positions are in the cache."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        inputs["pixel_values"] = pixel_values if is_first_iteration or not kwargs.get("use_cache", True) else None
        return inputs


FORWARD_NAMES = ("input_ids", "pixel_values", "attention_mask", "labels", "inputs_embeds", "extension_targets")


@functools.cache
def check_names(names: frozenset[str]) -> None:
    """The LLM takes any keyword (transformers' kwargs): a misspelled input of beni's own would vanish there."""
    for name in names:
        if close := difflib.get_close_matches(name, FORWARD_NAMES, n=1, cutoff=0.85):
            raise TypeError(f"forward() got {name!r}, which it does not take: did you mean {close[0]!r}?")


def check_image_tokens(image_tokens: int, images: int, tokens_per_image: int) -> None:
    """A clear error where a batch's image-token count does not match its images."""
    if images == 0 and image_tokens:
        raise ValueError("The prompt has image tokens but no pixel_values were given.")
    if image_tokens != images * tokens_per_image:
        raise ValueError(
            f"The batch has {image_tokens} image tokens but {images} images of {tokens_per_image} tokens each: build "
            "prompts with the model's processor (AutoProcessor), which expands each image to the model's image tokens."
        )


AutoModelForImageTextToText.register(BeniConfig, BeniForConditionalGeneration)
