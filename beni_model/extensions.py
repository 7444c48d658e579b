"""Extensions: task machinery that plugs into the core model without the core knowing the task.

An extension is an `nn.Module` class registered by name. A model whose `BeniConfig.extensions` maps that name to
the extension's own settings (a JSON-able dict) builds one instance under `model.extensions[name]`, so its weights
save and load with the model, and a model without extensions carries none of its fields or weights. The hooks:

- config and data, without a model (class methods, given the settings): `check` the settings, a `vision_stem` it
  provides, the `image_tokens` it appends to each image, `prepare` settings from the tokenizer (`from_parts`), the
  batch `targets` built from image samples' metadata (`collate`, keys `batch_keys`), `reply_ids`, its own token
  ids for a reply, and prompt text after each image's tokens: from a sample's metadata in training (`image_text`), read
  from the images by the processor at inference (`read_images`);
- the model (methods): `start` after the parts are loaded, the `loss` of its targets on the vision features (and the
  images), `refine_features` (the features the model goes on with), the `image_embeddings` it hands the LLM after
  each image's connector tokens, its own `answers` (scored by the eval
  beside the LLM's), `to_device` (compile or graph its passes); each weight follows a core part (`part_of`) for
  learning rates and freezing.

The trainer weighs each extension's loss by its stage's `weight` (default 1); its `encoder` stage trains the
vision tower (and the weights that follow it) on the extensions' losses alone, the LLM not run.
"""

import importlib
from collections.abc import Callable

import torch
from torch import nn

REGISTRY: dict[str, type["Extension"]] = {}
# Extensions that ship with beni, imported on first use, so a saved model that names one loads without an import.
BUILTIN = {"ocr": "beni_model.ocr"}


class Extension(nn.Module):
    batch_keys: tuple[str, ...] = ()  # the tensors `collate` adds to an image batch, handed to `loss` as `targets`

    def __init__(self, config, settings: dict):
        super().__init__()
        self.settings = settings

    @classmethod
    def check(cls, settings: dict, config) -> None:
        """Raise a one-sentence ValueError for settings this extension cannot build (`config`: the model's
        BeniConfig, or None where a training config is checked before there is a model)."""

    @classmethod
    def image_tokens(cls, settings: dict, grid: int) -> int:
        """LLM positions this extension adds after each image's connector tokens (a `grid` x `grid` patch image)."""
        return 0

    @classmethod
    def prepare(cls, settings: dict, tokenizer) -> dict:
        """The settings of a new model, completed from the LLM's tokenizer."""
        return settings

    @classmethod
    def collate(cls, settings: dict, grid: int, metas: list[dict]) -> dict[str, torch.Tensor]:
        """Targets for `loss` from a batch's image samples' metadata, in image order."""
        return {}

    @classmethod
    def reply_ids(cls, settings: dict, meta: dict, reply: str, tokenizer) -> list[int] | None:
        """Token ids for an assistant reply of an image sample, where this extension tokenizes it its own way."""
        return None

    @classmethod
    def image_text(cls, settings: dict, meta: dict) -> str:
        """Prompt text after an image sample's image tokens in training, from its metadata ("": none): what
        `read_images` gives for the image at inference."""
        return ""

    @classmethod
    def read_images(cls, settings: dict, images: list) -> list[str] | None:
        """Prompt text after each image's tokens at inference, read from the (PIL) images by the processor, or None
        where this extension adds none."""
        return None

    @classmethod
    def vision_stem(cls, name: str, vision_config) -> nn.Module:
        """A patch embedding this extension provides (`BeniConfig.vision_stem` "<extension>.<name>"), built with
        blank weights; `start` fills those of a new model. It maps pixels to the encoder's width at its patch grid and
        has `flops(image_size)`."""
        raise ValueError(f"The {cls.__name__} has no vision stem {name!r}.")

    def part_of(self, name: str) -> str:
        """The core part ("vision_tower", "connector", "language_model") whose learning rate and freezing the
        weight `name` (relative to this module) follows."""
        return "vision_tower"

    def start(self, model) -> None:
        """Initialise what depends on the loaded parts (after `from_parts` loads the LLM)."""

    def loss(self, model, features: torch.Tensor, targets: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor | None:
        """This extension's loss on the vision tower's output for `pixel_values`, or None where `targets` hold none of
        its keys."""
        return None

    def refine_features(self, model, pixel_values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The vision features the model goes on with, given the tower's for `pixel_values`: these by default; an
        extension may look again (the ocr extension encodes an image again once its text is set level)."""
        return features

    def image_embeddings(self, model, features: torch.Tensor, targets: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        """[images, image_tokens, text hidden] for the LLM after each image's connector tokens, or None. `targets`: the
        batch's (`collate`'s), where training has them: what the extension should have read, for teacher forcing."""
        return None

    def answers(self, model, features: torch.Tensor) -> list[str] | None:
        """An answer of its own per image, which the eval scores beside the LLM's, or None."""
        return None

    def to_device(self, device: torch.device, compile: bool) -> None:
        """Device-specific speed-ups once the model is on `device` (`compile`: the trainer compiles too)."""


def register(name: str) -> Callable[[type[Extension]], type[Extension]]:
    def add(cls: type[Extension]) -> type[Extension]:
        REGISTRY[name] = cls
        return cls

    return add


def extension_class(name: str) -> type[Extension]:
    """The class registered as `name`; a built-in one is imported on first use, and "package.module:Class" names
    one anywhere on the path (so a launched trainer process finds it too)."""
    if name not in REGISTRY:
        module, _, attribute = name.partition(":")
        try:
            imported = importlib.import_module(BUILTIN.get(name, module)) if name in BUILTIN or attribute else None
        except ImportError as error:
            raise ValueError(f"Extension {name!r} cannot be imported ({error}): check its module path.") from None
        if attribute:
            REGISTRY[name] = getattr(imported, attribute)
    if name not in REGISTRY:
        raise ValueError(f"Unknown extension {name!r}: use one of {sorted(set(REGISTRY) | set(BUILTIN))} or 'package.module:Class'.")
    return REGISTRY[name]
