"""Training examples from conversations, in either of two forms:

- LLaVA's turns, `[{"from": "human" | "gpt" | "system", "value": str}, ...]` with `<image>` markers where the
  images go;
- transformers' messages, `[{"role": "user" | "assistant" | "system", "content": str | [item, ...]}, ...]`, where
  an item is `{"type": "image"}` or `{"type": "text", "text": str}` (a string content may carry `<image>` markers).

Text is rendered with the processor's chat template (the LLM's own, or FALLBACK_TEMPLATE when it has none, behind
a preamble that flattens typed content the way `to_messages` does), each image becomes the processor's
`num_image_tokens` image tokens, and only assistant replies (with their end-of-turn token) carry labels.
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
# Typed content flattened to one string before the LLM's template runs (the LLM templates read string content): an
# image item is IMAGE_MARKER and a line break, a text item its text, as `flatten` does in Python. With images last
# (BeniConfig.images_last), a user turn's images, each already expanded to its tokens or not, follow its text.
TYPED_CONTENT = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set parts.text = parts.text + '@IMAGE@\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set parts.text = parts.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = parts.text -%}{%- endif -%}"
    "{%- if @IMAGES_LAST@ and message['role'] == 'user' and '@IMAGE@' in content -%}"
    "{%- set text = content.replace('@IMAGE@\n', '').replace('@IMAGE@', '').rstrip('\n') -%}"
    "{%- set content = (text ~ '\n' if text else '') ~ '@IMAGE@' * content.count('@IMAGE@') -%}"
    "{%- endif -%}"
    "{%- set flat.messages = flat.messages + [{'role': message['role'], 'content': content}] -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
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


def chat_template(llm_template: str | None, image_token: str = IMAGE_MARKER, images_last: bool = False) -> str:
    """A processor's template: TYPED_CONTENT's preamble, then the LLM's template (FALLBACK_TEMPLATE without one)."""
    preamble = TYPED_CONTENT.replace("@IMAGE@", image_token).replace("@IMAGES_LAST@", "true" if images_last else "false")
    return preamble + (llm_template or FALLBACK_TEMPLATE)


def flatten(content: str | list[dict]) -> str:
    if isinstance(content, str):
        return content
    if bad := [item for item in content if not isinstance(item, dict) or item.get("type") not in ("image", "text")]:
        raise ValueError(f"Message content item {bad[0]!r} is not {{'type': 'image'}} or {{'type': 'text', 'text': ...}}.")
    return "".join(f"{IMAGE_MARKER}\n" if item["type"] == "image" else item["text"] for item in content)


def to_messages(conversation: list[dict]) -> list[dict]:
    """role/content messages with string content, IMAGE_MARKER where each image goes, from either form."""
    messages = []
    for turn in conversation:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"Unknown conversation role {turn.get('from', turn.get('role'))!r}: use one of {sorted(ROLES)}.")
        messages.append({"role": role, "content": flatten(turn["value"] if "from" in turn else turn["content"])})
    return messages


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def expand_images(messages: list[dict], processor, image_text: str = "") -> list[dict]:
    """Each IMAGE_MARKER becomes the processor's image tokens, followed by `image_text` (the extensions' text after an
    image, Extension.image_text)."""
    tokens = processor.image_token * processor.num_image_tokens + image_text
    return [{**m, "content": m["content"].replace(IMAGE_MARKER, tokens)} for m in messages]


def _tokenize_with_labels(processor, messages: list[dict], reply_ids: Callable | None) -> tuple[list[int], list[int]]:
    tokenizer = processor.tokenizer
    text = render(processor, messages)
    reply_spans = []  # character ranges of assistant replies: after the generation prompt, through end of turn
    cuts, given = [0], []  # the text's pieces, alternately tokenized as a whole and given by reply_ids (their ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        with_prompt = render(processor, messages[:i], add_generation_prompt=True)
        through_reply = render(processor, messages[: i + 1])
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
    image_token_id = processor.image_token_id
    labels = [
        token if token != image_token_id and any(start <= lo and hi <= end for start, end in reply_spans) else IGNORE_INDEX
        for token, (lo, hi) in zip(input_ids, offsets)
    ]
    return input_ids, labels


def build_example(
    conversation: list[dict],
    processor,
    max_length: int | None = None,
    reply_ids: Callable[[str], list[int] | None] | None = None,
    image_text: str = "",
) -> Example:
    """Tokens and labels for one conversation. When it is longer than `max_length`, whole trailing turns are
    dropped (never part of an image block; the result says how many); raises SampleTooLong when even the first
    exchange does not fit.

    `reply_ids(reply)` may give an assistant reply's token ids itself (an extension's label hook,
    Extension.reply_ids); None leaves the reply to be tokenized with the rest of the text. Its ids all carry labels.
    `image_text` follows each image's tokens (Extension.image_text)."""
    plain = to_messages(conversation)
    messages = expand_images(plain, processor, image_text)
    # Cut points: after each assistant reply, longest first.
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"][::-1]
    if not ends:
        raise ValueError("The conversation has no assistant turn, so it has nothing to learn from.")
    for end in ends:
        input_ids, labels = _tokenize_with_labels(processor, messages[:end], reply_ids)
        if max_length is None or len(input_ids) <= max_length:
            num_images = sum(m["content"].count(IMAGE_MARKER) for m in plain[:end])
            return Example(input_ids, labels, num_images, dropped_turns=len(messages) - end)
    raise SampleTooLong(f"The first exchange alone is {len(input_ids)} tokens, over max_length {max_length}.")


def prompt_text(conversation: list[dict], processor) -> str:
    """A conversation ending with a user turn, rendered with the assistant generation prompt, IMAGE_MARKER where each
    image goes: the text for `processor(text=..., images=...)`, which expands the markers."""
    return render(processor, to_messages(conversation), add_generation_prompt=True).replace(IMAGE_MARKER, processor.image_token)


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
