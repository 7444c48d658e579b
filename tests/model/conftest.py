"""Tiny real models (random weights) saved to disk and loaded back through from_pretrained, like hub ids."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BitImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.processing import BeniProcessor

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is written in the image? The sign says open. Describe the picture in detail.",
    "A red car parked next to a blue house. How many cats are there? There are two cats.",
    "Read the text: hello world 123. The answer is yes. Thank you, that is correct!",
]
torch.set_num_threads(1)  # tiny models: threads cost more than they give on a shared 2-core machine
IMAGE_SIZE = 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# 64 wide: bitsandbytes 0.50's CPU 4-bit kernels need in_features to be a multiple of their block size (64).
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
}


def train_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, chat_template=chat_template)


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny pretrained parts: LLMs carry their tokenizer (`llama` ties its embeddings)."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    chat_tokenizer, base_tokenizer = train_tokenizer(CHATML), train_tokenizer(None)
    builds = {
        "llama": (LlamaForCausalLM(LlamaConfig(vocab_size=len(chat_tokenizer), tie_word_embeddings=True, **TEXT)), chat_tokenizer),
        "qwen2": (Qwen2ForCausalLM(Qwen2Config(vocab_size=len(base_tokenizer), tie_word_embeddings=False, **TEXT)), base_tokenizer),
        "clip": (CLIPVisionModel(CLIPVisionConfig(**VISION)), None),
        "siglip": (SiglipVisionModel(SiglipVisionConfig(**VISION)), None),
        "dinov2": (
            Dinov2Model(
                Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=IMAGE_SIZE, patch_size=8)
            ),
            None,
        ),
    }
    paths = {}
    for name, (model, tokenizer) in builds.items():
        model.save_pretrained(root / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    # DINOv2's preprocessor config as its hub checkpoints ship it, scaled to the tiny size: shortest edge 256 / 224 of
    # the crop, ImageNet statistics (its family's default processor, BitImageProcessor, has CLIP's).
    BitImageProcessorPil(
        size={"shortest_edge": 37}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    ).save_pretrained(root / "dinov2")
    return paths


@pytest.fixture(scope="session")
def build(parts):
    """build(vision, text, connector, **config) -> (model, tokenizer), a fresh model from the tiny parts."""

    def make(vision: str = "siglip", text: str = "llama", connector: str = "mlp2x_gelu", **config_kwargs):
        torch.manual_seed(0)
        config = BeniConfig(vision_model=parts[vision], text_model=parts[text], connector=connector, **config_kwargs)
        tokenizer = load_tokenizer(parts[text], config.image_token)
        return BeniForConditionalGeneration.from_parts(config, tokenizer).eval(), tokenizer

    return make


def processor_of(model, tokenizer) -> BeniProcessor:
    return BeniProcessor.for_model(model.config, tokenizer)


def pictures(n: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE), seed: int = 0) -> list:
    """`n` RGB PIL images of random pixels, `size` (width, height)."""
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()) for _ in range(n)]


def images(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
