"""OpenAI chat messages -> a model's inputs: prompt token ids and pixel values.

The one place the server knows how a model wants its prompt and images: the model's processor (BeniProcessor, or the
LlavaProcessor of a LLaVA export) renders the chat, expands the image markers and preprocesses the images, as the
eval does.
"""

import base64
import binascii
from dataclasses import dataclass

import torch

from beni_model.chat import IMAGE_MARKER, prompt_text
from beni_model.data import decode_image

ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}


class BadRequest(Exception):
    """A request the server refuses: `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class Conversation:
    turns: list[dict]  # beni_model.chat's form: {"from": ..., "value": text with IMAGE_MARKER where each image stands}
    image_urls: list[str]  # in reading order


def conversation(messages: list[dict], max_images: int) -> Conversation:
    """The turns and image URLs of OpenAI messages (content a string or a list of text and image_url parts)."""
    turns, urls = [], []
    for i, message in enumerate(messages):
        role = ROLES.get(message.get("role"))
        if role is None:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(ROLES)}, not {message.get('role')!r}.", f"messages[{i}].role")
        content = message.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        pieces = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                if IMAGE_MARKER in part["text"]:
                    raise BadRequest(
                        f"{where} contains {IMAGE_MARKER!r}, which stands for an image: send images as image_url parts.", where
                    )
                pieces.append(part["text"])
            elif part.get("type") == "image_url" and role == "human" and isinstance(part.get("image_url"), dict):
                urls.append(str(part["image_url"].get("url", "")))
                pieces.append(IMAGE_MARKER)
            else:
                raise BadRequest(f"{where} must be a text part, or an image_url part in a user message.", where)
        turns.append({"from": role, "value": "\n".join(pieces)})
    if not turns or turns[-1]["from"] != "human":
        raise BadRequest("The last message must be the user's: the model answers it.", "messages")
    if len(urls) > max_images:
        raise BadRequest(
            f"The messages hold {len(urls)} images; this server takes at most {max_images} per request.", "messages", "too_many_images"
        )
    return Conversation(turns, urls)


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 `data:` URL."""
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise BadRequest("An image data URL must be base64: data:image/...;base64,<data>.", code="invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            "The image data URL's base64 does not decode: send the image's bytes base64-encoded.", code="invalid_base64"
        ) from None


@dataclass
class ModelInputs:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [images, 3, size, size], normalized; None without images


def model_inputs(chat: Conversation, images: list[bytes], processor) -> ModelInputs:
    """Prompt ids (the chat template with the generation prompt, each image's marker expanded to its tokens) and the
    images preprocessed by the processor. `images` are already checked encoded images (Fetcher.process)."""
    text = prompt_text(chat.turns, processor)
    inputs = processor(text=text, images=[decode_image(data) for data in images] or None, add_special_tokens=False, return_tensors="pt")
    return ModelInputs(inputs["input_ids"][0].tolist(), inputs.get("pixel_values"))
