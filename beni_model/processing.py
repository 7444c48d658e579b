"""BeniProcessor: the model's image processor, tokenizer and chat template in one `ProcessorMixin`, saved with the
model and loaded by `AutoProcessor`. It renders chats (LLaVA's `from`/`value` turns or transformers' `role`/`content`
messages), expands each image marker to the model's image tokens (followed by the text its extensions read from the
image, Extension.read_images) and preprocesses the images as the encoder's own image processor does."""

from pathlib import Path

from transformers import AutoImageProcessor, AutoProcessor, ProcessorMixin
from transformers.image_utils import make_flat_list_of_images
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES, get_image_processor_class_from_name

from beni_model.chat import chat_template, load_tokenizer
from beni_model.config import BeniConfig
from beni_model.extensions import extension_class


class BeniProcessor(ProcessorMixin):
    """`processor(text=..., images=...)` gives `input_ids`, `attention_mask` and `pixel_values` for the model: each
    image token in the text becomes `num_image_tokens` of them (the count the model's connector and extensions emit
    per image at its image size)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token="<image>",
        num_image_tokens=1,
        images_last=False,
        extensions=None,
        **kwargs,
    ):
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.images_last = images_last  # the chat template puts a user turn's images after its text
        self.extensions = extensions or {}  # the model's, for the text they read from each image
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token: load it with beni_model.chat.load_tokenizer.")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or default_template(tokenizer, image_token, images_last))

    def _process_images(self, images, **kwargs):
        # ProcessorMixin's one step that sees the images beside each image's replacement text (replace_image_token
        # sees only the processed pixels): the extensions' reads join that text here.
        processed, replacements = super()._process_images(images, **kwargs)
        if self.extensions:
            images = make_flat_list_of_images(images)
            for name, settings in self.extensions.items():
                if (texts := extension_class(name).read_images(settings, images)) is not None:
                    replacements = [tokens + text for tokens, text in zip(replacements, texts)]
        return processed, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    @classmethod
    def for_model(cls, config: BeniConfig, tokenizer) -> "BeniProcessor":
        """A new model's processor: the encoder's image processor at the model's image size, the LLM's tokenizer
        (with the image token) and its chat template."""
        return cls(
            image_processor_for(config),
            tokenizer,
            image_token=config.image_token,
            num_image_tokens=config.num_image_tokens(),
            images_last=config.images_last,
            extensions=config.extensions,
        )


def default_template(tokenizer, image_token: str, images_last: bool = False) -> str:
    return chat_template(tokenizer.chat_template, image_token, images_last)


def image_processor_for(config: BeniConfig):
    """The encoder's own image processor (its folder's preprocessor_config.json, or a hub id's), else its family's
    default, resized for `config.image_size`: processors that keep the aspect (shortest edge, then a centre crop)
    keep it, with the crop at the model's size."""
    source = config.vision_model
    if source and (not Path(source).is_dir() or (Path(source) / "preprocessor_config.json").is_file()):
        processor = AutoImageProcessor.from_pretrained(source)
    else:
        processor = family_image_processor(config.vision_config)
    return sized(processor, config.image_size)


def family_image_processor(vision_config):
    # The module that defines the config names the family (siglip_vision_model lives in models.siglip).
    family = type(vision_config).__module__.split(".")[-2]
    for name in (vision_config.model_type, family, family.removesuffix("_with_registers")):
        if classes := IMAGE_PROCESSOR_MAPPING_NAMES.get(name):
            return get_image_processor_class_from_name(classes["pil"])()
    raise ValueError(
        f"transformers has no image processor for {vision_config.model_type!r}: save the encoder's preprocessor_config.json in its folder."
    )


def sized(processor, image_size: int):
    size, crop = dict(processor.size), getattr(processor, "crop_size", None)
    if "shortest_edge" in size and crop and getattr(processor, "do_center_crop", False):
        processor.size = {"shortest_edge": round(image_size * size["shortest_edge"] / crop["height"])}
        processor.crop_size = {"height": image_size, "width": image_size}
    else:
        processor.size = {"height": image_size, "width": image_size}
        processor.do_center_crop = False
    return processor


def load_processor(model_dir: str | Path, config: BeniConfig | None = None) -> BeniProcessor:
    """The processor saved with a beni model; a folder saved without one (older saves) gets the family default built
    from its config and tokenizer."""
    if (Path(model_dir) / "processor_config.json").is_file():
        return BeniProcessor.from_pretrained(model_dir)
    config = config or BeniConfig.from_pretrained(model_dir)
    return BeniProcessor.for_model(config, load_tokenizer(str(model_dir), config.image_token))


AutoProcessor.register(BeniConfig, BeniProcessor)
