"""Training examples and prompts from LLaVA-style conversations.

A conversation is `[{"from": "human" | "gpt" | "system", "value": str}, ...]` with `<image>` markers where the
images go. Text is rendered with the tokenizer's own chat template (or FALLBACK_TEMPLATE when it has none),
each marker becomes `tokens_per_image` image tokens, and only assistant replies (with their end-of-turn
token) carry labels.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# For tokenizers without a chat template (base LLMs): plain role prefixes, replies end with EOS.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class SampleTooLong(ValueError):
    """Even the first exchange of the conversation does not fit in max_length; the sample must be dropped."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # the sample's first num_images images are used (trailing turns may have been dropped)
    dropped_turns: int  # trailing turns removed so the example fits max_length


def load_tokenizer(path: str, image_token: str = IMAGE_MARKER) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer with the image token added as one special token, and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def to_messages(conversation: list[dict], image_token: str, tokens_per_image: int) -> list[dict]:
    messages = []
    for turn in conversation:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"Unknown conversation role {turn['from']!r}: use one of {sorted(ROLES)}.")
        messages.append({"role": role, "content": turn["value"].replace(IMAGE_MARKER, image_token * tokens_per_image)})
    return messages


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=None if tokenizer.chat_template else FALLBACK_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def _tokenize_with_labels(tokenizer, messages: list[dict], image_token: str, reply_ids: Callable | None) -> tuple[list[int], list[int]]:
    text = render(tokenizer, messages)
    reply_spans = []  # character ranges of assistant replies: after the generation prompt, through end of turn
    cuts, given = [0], []  # the text's pieces, alternately tokenized as a whole and given by reply_ids (their ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        with_prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        through_reply = render(tokenizer, messages[: i + 1])
        if not (text.startswith(with_prompt) and text.startswith(through_reply)):
            raise ValueError(
                "The chat template renders earlier turns differently once later turns follow, so reply labels cannot be placed; use a prefix-stable template."
            )
        reply_spans.append((len(with_prompt), len(through_reply)))
        reply = message["content"]
        ids = reply_ids(reply) if reply_ids and text.startswith(reply, len(with_prompt)) else None
        if ids is not None:
            cuts += [len(with_prompt), len(with_prompt) + len(reply)]
            given.append(ids)
    cuts.append(len(text))
    input_ids, offsets = [], []
    for piece, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        if piece % 2:
            ids = given[piece // 2]
            input_ids += ids
            offsets += [(lo, hi)] * len(ids)
        else:
            encoded = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
            input_ids += encoded["input_ids"]
            offsets += [(lo + a, lo + b) for a, b in encoded["offset_mapping"]]
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    labels = [
        token if token != image_token_id and any(start <= lo and hi <= end for start, end in reply_spans) else IGNORE_INDEX
        for token, (lo, hi) in zip(input_ids, offsets)
    ]
    return input_ids, labels


def build_example(
    conversation: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    tokens_per_image: int,
    max_length: int | None = None,
    image_token: str = IMAGE_MARKER,
    reply_ids: Callable[[str], list[int] | None] | None = None,
) -> Example:
    """Tokens and labels for one conversation. When it is longer than `max_length`, whole trailing turns are
    dropped (never part of an image block; the result says how many); raises SampleTooLong when even the first
    exchange does not fit.

    `reply_ids(reply)` may give an assistant reply's token ids itself (an extension's label hook,
    Extension.reply_ids); None leaves the reply to be tokenized with the rest of the text. Its ids all carry labels."""
    messages = to_messages(conversation, image_token, tokens_per_image)
    # Cut points: after each assistant reply, longest first.
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"][::-1]
    if not ends:
        raise ValueError("The conversation has no assistant ('gpt') turn, so it has nothing to learn from.")
    for end in ends:
        input_ids, labels = _tokenize_with_labels(tokenizer, messages[:end], image_token, reply_ids)
        if max_length is None or len(input_ids) <= max_length:
            num_images = sum(turn["value"].count(IMAGE_MARKER) for turn in conversation[:end])
            return Example(input_ids, labels, num_images, dropped_turns=len(messages) - end)
    raise SampleTooLong(f"The first exchange alone is {len(input_ids)} tokens, over max_length {max_length}: the sample is dropped.")


def build_prompt(
    conversation: list[dict], tokenizer: PreTrainedTokenizerBase, tokens_per_image: int, image_token: str = IMAGE_MARKER
) -> list[int]:
    """Token ids of a conversation ending with a user turn, followed by the assistant generation prompt."""
    text = render(tokenizer, to_messages(conversation, image_token, tokens_per_image), add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_batch(
    sequences: list[list[int]], pad_token_id: int, padding_side: str = "right", labels: list[list[int]] | None = None, multiple_of: int = 1
) -> dict:
    """Pad token lists into `input_ids` / `attention_mask` (and `labels`) tensors, `multiple_of` tokens wide; use left
    padding to generate."""
    width = -(-max(len(s) for s in sequences) // multiple_of) * multiple_of

    def pad(rows, value):
        padded = [[value] * (width - len(r)) + r if padding_side == "left" else r + [value] * (width - len(r)) for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    batch = {"input_ids": pad(sequences, pad_token_id), "attention_mask": pad([[1] * len(s) for s in sequences], 0)}
    if labels is not None:
        batch["labels"] = pad(labels, IGNORE_INDEX)
    return batch


def fill_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of consecutive sequences per row: a new row when the next one does not fit in `width` tokens."""
    rows, used = [], width
    for i, n in enumerate(lengths):
        if used + n > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack_batch(sequences: list[list[int]], labels: list[list[int]], max_length: int, pad_token_id: int, multiple_of: int = 1) -> dict:
    """Concatenate sequences, in order, into rows padded at the end, at the row width (at most `max_length`) that
    leaves the fewest cells, rows x width: filled to max_length, the last row can be near-empty yet as wide as the
    rest. `position_ids` restart at 0 for each sequence and for the padding, so with no attention mask the model's
    attention stays inside each sequence (transformers reads the blocks from position_ids); each sequence's first
    label is ignored, so no sequence is trained to predict the next one's start. `attention_mask` marks the real
    tokens, for counting."""
    lengths = [len(s) for s in sequences]
    if max(lengths) > max_length:
        raise ValueError(f"A sequence of {max(lengths)} tokens does not fit rows of max_length {max_length}: build it with that limit.")

    def cells(rows):
        return len(rows) * max(sum(lengths[i] for i in row) for row in rows)

    # A row's width is the token count of a run of consecutive sequences: the only widths worth trying.
    ends = list(itertools.accumulate(lengths, initial=0))
    widths = sorted({b - a for i, a in enumerate(ends) for b in ends[i + 1 :] if max(lengths) <= b - a <= max_length})
    rows = min((fill_rows(lengths, width) for width in widths), key=cells)
    ids = [[t for i in row for t in sequences[i]] for row in rows]
    row_labels = [[t for i in row for t in [IGNORE_INDEX] + labels[i][1:]] for row in rows]
    batch = pad_batch(ids, pad_token_id, labels=row_labels, multiple_of=multiple_of)
    width = batch["input_ids"].shape[1]
    positions = [[p for i in row for p in range(lengths[i])] for row in rows]
    batch["position_ids"] = torch.tensor([p + list(range(width - len(p))) for p in positions])
    return batch
