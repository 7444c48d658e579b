"""The tiny LLM the CPU recipe trains (beni_model.tiny): its lessons in copying from the prompt."""

import itertools

from transformers import AutoTokenizer

from beni_model.tiny import COPY_QUESTIONS, copy_chats, tiny_llm


def test_copy_chats_train_only_a_reply_that_repeats_the_users_string_one_token_a_character(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm(tmp_path / "llm"))
    for ids, labels in itertools.islice(copy_chats(tokenizer), 50):
        start = next(i for i, label in enumerate(labels) if label != -100)
        reply, prompt = ids[start:], tokenizer.decode(ids[:start])
        assert labels[start:] == reply and reply[-1] == tokenizer.eos_token_id and labels[:start] == [-100] * start
        text = tokenizer.decode(reply[:-1])
        assert len(reply) - 1 == len(text) and text in prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert prompt.endswith("<|im_start|>assistant\n") and any(f"\n{q}<|im_end|>" in prompt for q in COPY_QUESTIONS)
