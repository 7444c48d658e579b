"""Training recipes: a list of trainer stages (TrainConfig fields) built offline.

Each stage trains in its own folder and starts from the final model of the stage before it.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from beni_model.files import atomic_path
from beni_model.smollm2 import smollm2_instruct

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A SigLIP-configured ViT trained from scratch (no pretrained encoder offline): 8 layers of 512 over 16 px
# patches at 384 px, so the smallest corpus text (16 px) still spans a patch; pixel shuffle makes 144 LLM tokens.
# Its patches come from a conv stem (vision.ConvStem): single printed letters, 300 steps with the LLM frozen, 90%
# held out against 28% with the linear patchify (bench/glyph_probe.py).
SIGLIP_OCR = {
    "model_type": "siglip_vision_model",
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "image_size": 384,
    "patch_size": 16,
}
# The CPU recipe's ViT: one layer of 64 over 4 px patches at 64 px behind the conv stem, so a line of digits squeezed
# into the square input still gives a column or two per digit, and a step stays cheap enough for minutes on 2 cores.
TINY_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 4,
}


def tiny_llm(folder: Path) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer (any text tokenizes) and a ChatML template: seconds on CPU."""
    if (folder / "config.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["Describe the image. The text in the picture reads: hello world 0123456789."], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", chat_template=CHATML)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def tiny(cache: Path) -> list[dict]:
    """The CPU recipe, minutes on 2 cores: the smollm2-siglip recipe's shape (an encoder stage on the ocr extension's
    reading loss alone, then everything with the reads handed to the LLM as tokens) with a tiny ViT and the 2-layer
    tiny_llm. Most steps go to the encoder stage: they cost less than joint steps, and reading is what a vision tower
    trained from scratch learns last (bench/BENCHMARKS.md)."""
    parts = {
        "text_model": str(tiny_llm(cache / "tiny-llama")),
        "vision_config": TINY_VISION,
        "connector": "pixelshuffle2_mlp2x_gelu",
        "vision_stem": "conv",
        "extensions": {"ocr": {"weight": 1.0, "tokens": True}},
        "max_length": 256,
        "save_every": 1000,
        "workers": 1,
    }
    return [
        {"name": "encoder", **parts, "stage": "encoder", "lr": 3e-3, "max_steps": 900, "batch_size": 16, "warmup_steps": 10},
        {"name": "finetune", **parts, "lr": 3e-3, "max_steps": 100, "batch_size": 16, "warmup_steps": 10},
    ]


def smollm2_siglip(cache: Path) -> list[dict]:
    """SmolLM2-135M-Instruct + a SigLIP ViT with a conv stem trained from scratch, sized for ten minutes on one GPU.

    Through the LLM's loss alone a ViT trained from scratch learns which letters an image holds but not where they
    sit, and four scored runs read nothing (bench/BENCHMARKS.md). So the encoder stage first trains the vision
    tower alone on the ocr extension's reading loss (beni_model.ocr: a CTC head on its columns, each pooled over the
    rows its text is on, on the transcripts of the corpus's one-line images; and a line head reading each row of
    patches, on the documents' lines), without running the LLM; then everything trains together with that loss kept
    on. What the heads read also reaches the LLM as tokens in its own character embeddings (`tokens`, `lines`), and the
    replies that are an image's transcript train one token per character, so the LLM copies the heads token for
    token. Each compiled block is a CUDA graph on one GPU (the step is bound by kernel launches; off under FSDP):
    about 530 s of training on an H200, 64.0% held out (bench/BENCHMARKS.md)."""
    parts = {
        "text_model": str(smollm2_instruct()),
        "vision_config": SIGLIP_OCR,
        "connector": "pixelshuffle2_mlp2x_gelu",
        "vision_stem": "conv",
        "extensions": {"ocr": {"weight": 1.0, "tokens": True, "lines": True}},
        "max_length": 512,
        "batch_size": 64,
        "save_every": 1000,
        "compile": True,
        "cuda_graphs": True,
        "workers": 12,
    }
    return [
        {"name": "encoder", **parts, "stage": "encoder", "lr": 1e-3, "max_steps": 4000, "warmup_steps": 200},
        {
            "name": "finetune", **parts, "lr": 5e-5, "part_lr": {"vision_tower": 3e-4, "connector": 1e-3},
            "max_steps": 1800, "warmup_steps": 200,
        },
    ]


RECIPES = {"tiny": tiny, "smollm2-siglip": smollm2_siglip}
CPU_RECIPE = "tiny"  # the one recipe that runs without a GPU: minutes on a CPU, reading the digit strings of its CPU corpus
