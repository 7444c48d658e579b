"""A tiny LLM built on this machine in seconds, no hub: what the CPU recipe trains and the tests build on."""

import random
import string
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from beni_model.files import atomic_path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The tiny LLM's shape: the CPU recipe's LLM, and the benches' stand-in for one.
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
)
# Its lessons in repeating the user's text: questions other than any a dataset asks, so what it learns is to copy.
COPY_QUESTIONS = (
    "Repeat the text.",
    "What does it say?",
    "Copy the line above.",
    "Say it again.",
    "What is written above?",
    "Read it back.",
)
COPY_STEPS = 2000
# At most this many other tokens before the text to repeat and pads after it: the CPU recipe's image tokens before its
# reads (16) and some of the blank slots after them; a lesson of longer runs does not form the copy in COPY_STEPS.
COPY_BEFORE, COPY_AFTER = 16, 16


def tiny_llm(folder: Path, copy_steps: int = 0) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer (any text tokenizes) and a ChatML template: seconds on CPU.
    With `copy_steps` (COPY_STEPS for the CPU recipe's), first taught to repeat text from its prompt (`teach_copying`):
    minutes, so the recipes build it once per machine."""
    if (folder / "config.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["Describe the image. The text in the picture reads: hello world 0123456789."], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA))
    if copy_steps:
        teach_copying(model, tokenizer, copy_steps)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def teach_copying(model, tokenizer, steps: int, batch_size: int = 32, lr: float = 3e-3) -> None:
    """Train `model` on chats whose reply repeats text from the user's turn (`copy_chats`): the skill a pretrained LLM
    brings to a vision-language recipe, copying from its prompt, which a model trained from scratch on image answers
    alone does not find in the CPU recipe's minutes (bench/BENCHMARKS.md). Text-only chats of a few dozen tokens keep
    a step cheap."""
    chats = copy_chats(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Warm up, then decay: the copying circuit forms late in the run and settles as the rate falls.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50) * (1 - step / steps) ** 0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: a second thread costs more than it gives, far more on a busy machine
    try:
        model.train()
        for _ in range(steps):
            batch = [next(chats) for _ in range(batch_size)]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch])
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def copy_chats(tokenizer, seed: int = 0) -> Iterator[tuple[list[int], list[int]]]:
    """Chats (token ids, labels) of a user turn holding a string of digits, numbers or letters and a question, and a
    reply that repeats the string. The string is one token a character, as the ocr extension hands its reads over and
    tokenizes such a reply, and sits among other tokens: a run of non-character tokens before it, as an image's own
    tokens come before its reads, and of padding after, as blank reads follow them."""
    rng = random.Random(seed)
    characters = {c: tokenizer.encode(c, add_special_tokens=False)[0] for c in string.printable}
    others = [i for i in tokenizer.convert_tokens_to_ids(pre_tokenizers.ByteLevel.alphabet()) if i not in characters.values()]
    while True:
        kind = rng.random()
        if kind < 0.5:
            text = "".join(rng.choices(string.digits, k=rng.randint(3, 14)))
        elif kind < 0.7:
            text = " ".join(str(rng.randint(1000, 9999)) for _ in range(rng.randint(2, 3)))
        else:
            text = "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(3, 14)))
        noise, padding = rng.choices(others, k=rng.randint(0, COPY_BEFORE)), [tokenizer.pad_token_id] * rng.randint(0, COPY_AFTER)
        message = {"role": "user", "content": "\0\n" + rng.choice(COPY_QUESTIONS)}
        before, after = tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False).split("\0")
        prompt = tokenizer.encode(before, add_special_tokens=False) + noise + [characters[c] for c in text] + padding
        prompt += tokenizer.encode(after, add_special_tokens=False)
        reply = [characters[c] for c in text] + [tokenizer.eos_token_id]
        yield prompt + reply, [-100] * len(prompt) + reply
