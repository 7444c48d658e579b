import itertools

import pytest
from transformers import SiglipImageProcessorPil

from beni_model.chat import IGNORE_INDEX, SampleTooLong, build_example, load_tokenizer, pack_batch, pad_batch, prompt_text
from beni_model.ocr import OcrExtension
from beni_model.processing import BeniProcessor

N = 5  # image tokens per image

IMAGE_IN_SECOND_TURN = [
    {"from": "human", "value": "Read the text: hello world"},
    {"from": "gpt", "value": "hello world"},
    {"from": "human", "value": "<image>\nWhat is written in the image?"},
    {"from": "gpt", "value": "The sign says open."},
]


def processor(tokenizer) -> BeniProcessor:
    return BeniProcessor(SiglipImageProcessorPil(), tokenizer, num_image_tokens=N)


@pytest.fixture(scope="module")
def chatml(parts):
    return load_tokenizer(parts["llama"])


@pytest.fixture(scope="module")
def base(parts):
    return load_tokenizer(parts["qwen2"])  # no chat template: the fallback applies


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def image_runs(tokenizer, ids):
    """Lengths of the consecutive runs of image tokens."""
    image_id, runs, run = tokenizer.convert_tokens_to_ids("<image>"), [], 0
    for token in ids + [None]:
        if token == image_id:
            run += 1
        elif run:
            runs, run = runs + [run], 0
    return runs


def test_image_in_second_turn_and_loss_on_every_reply(chatml):
    example = build_example(IMAGE_IN_SECOND_TURN, processor(chatml))
    assert trained_text(chatml, example) == "hello world<|im_end|>\nThe sign says open.<|im_end|>\n"
    assert image_runs(chatml, example.input_ids) == [N] and example.num_images == 1 and example.dropped_turns == 0
    image_at = example.input_ids.index(chatml.convert_tokens_to_ids("<image>"))
    text_before = chatml.decode(example.input_ids[:image_at])
    assert text_before.endswith("<|im_start|>user\n") and "assistant\nhello world" in text_before
    assert example.labels[image_at : image_at + N] == [IGNORE_INDEX] * N


def test_labels_align_with_input_ids(chatml):
    example = build_example(IMAGE_IN_SECOND_TURN, processor(chatml))
    assert len(example.labels) == len(example.input_ids)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))
    # Nothing of the user turns or the assistant headers is trained.
    assert "user" not in trained_text(chatml, example) and "assistant" not in trained_text(chatml, example)


def test_no_image(chatml):
    example = build_example(IMAGE_IN_SECOND_TURN[:2], processor(chatml))
    assert example.num_images == 0 and image_runs(chatml, example.input_ids) == []
    assert trained_text(chatml, example) == "hello world<|im_end|>\n"


def test_several_images_in_one_turn_and_across_turns(chatml):
    conversation = [
        {"from": "human", "value": "<image> <image>\nCompare them."},
        {"from": "gpt", "value": "The first is red."},
        {"from": "human", "value": "And this one? <image>"},
        {"from": "gpt", "value": "It is blue."},
    ]
    example = build_example(conversation, processor(chatml))
    assert image_runs(chatml, example.input_ids) == [N, N, N] and example.num_images == 3
    assert trained_text(chatml, example) == "The first is red.<|im_end|>\nIt is blue.<|im_end|>\n"


def spelling(tokenizer, transcript: str):
    """The ocr extension's reply hook for an image whose transcript is `transcript` (its `tokens` on)."""
    return lambda reply: OcrExtension.reply_ids({"tokens": True}, {"transcript": transcript}, reply, tokenizer)


def test_the_reply_that_is_the_transcript_is_spelled_one_token_per_character(chatml):
    whole = build_example(IMAGE_IN_SECOND_TURN, processor(chatml))
    spelled = build_example(IMAGE_IN_SECOND_TURN, processor(chatml), reply_ids=spelling(chatml, "hello world"))
    trained = [t for t, label in zip(spelled.input_ids, spelled.labels) if label != IGNORE_INDEX]
    characters = [chatml.encode(c, add_special_tokens=False)[0] for c in "hello world"]
    assert trained[: len(characters)] == characters  # the corpus tokenizer has a token for "hello": not used here
    assert len(whole.input_ids) < len(spelled.input_ids)
    assert trained_text(chatml, spelled) == trained_text(chatml, whole) == "hello world<|im_end|>\nThe sign says open.<|im_end|>\n"
    assert chatml.decode(spelled.input_ids) == chatml.decode(whole.input_ids)
    # Everything but the transcript's reply tokenizes as it does unspelled.
    first = spelled.labels.index(characters[0])
    word_tokens = len(chatml.encode("hello world", add_special_tokens=False))
    assert spelled.input_ids[:first] == whole.input_ids[:first]
    assert spelled.input_ids[first + len(characters) :] == whole.input_ids[first + word_tokens :]
    assert (
        build_example(IMAGE_IN_SECOND_TURN, processor(chatml), reply_ids=spelling(chatml, "not in the conversation")).input_ids
        == whole.input_ids
    )


def test_with_spell_lines_a_reply_written_on_a_documents_line_is_spelled_too(chatml):
    sign = {"lines": [["COMPASS FLORIST", 0.3], ["EST. 1952", 0.5], ["OPEN 9:00-19:00", 0.7]]}
    settings = {"tokens": True, "lines": True, "spell_lines": True}

    def spelled(reply: str, options: dict = settings) -> bool:
        ids = OcrExtension.reply_ids(options, sign, reply, chatml)
        assert ids is None or chatml.decode(ids) == reply
        return ids is not None and len(ids) == len(reply)

    # A whole line in another case, a run of its words, a value after its label: spelled.
    assert spelled("Compass Florist") and spelled("Florist") and spelled("1952") and spelled("9:00-19:00")
    # Across two lines, inside a word, not on the sign, or the setting off: as the tokenizer has it.
    assert not spelled("Florist EST") and not spelled("ompass") and not spelled("Daisy Florist")
    assert not spelled("Compass Florist", {"tokens": True, "lines": True})
    with pytest.raises(ValueError, match="spell_lines spells replies read off the line head's tokens: set tokens and lines too"):
        OcrExtension.reply_ids({"tokens": True, "spell_lines": True}, sign, "1952", chatml)


def test_fallback_template_for_tokenizers_without_one(base):
    example = build_example(IMAGE_IN_SECOND_TURN, processor(base))
    eos = base.eos_token
    assert trained_text(base, example) == f" hello world{eos}\n The sign says open.{eos}\n"
    assert base.decode(example.input_ids).startswith("User: Read the text: hello world\nAssistant: hello world")
    assert prompt_text(IMAGE_IN_SECOND_TURN[:1], processor(base)) == "User: Read the text: hello world\nAssistant:"


def test_truncation_drops_trailing_turns_never_half_an_image(chatml):
    conversation = [
        {"from": "human", "value": "<image>\nWhat is written?"},
        {"from": "gpt", "value": "open"},
        {"from": "human", "value": "<image>\nAnd here?"},
        {"from": "gpt", "value": "hello world"},
    ]
    full = build_example(conversation, processor(chatml))
    first = build_example(conversation[:2], processor(chatml))
    # A limit that falls inside the second image block: the whole second exchange goes.
    image_id = chatml.convert_tokens_to_ids("<image>")
    second_image_at = [i for i, t in enumerate(full.input_ids) if t == image_id][N]
    assert second_image_at > len(first.input_ids)
    cut = build_example(conversation, processor(chatml), max_length=second_image_at + 2)
    assert cut.input_ids == first.input_ids and cut.dropped_turns == 2 and cut.num_images == 1
    assert image_runs(chatml, cut.input_ids) == [N]
    assert build_example(conversation, processor(chatml), max_length=len(full.input_ids)).dropped_turns == 0
    with pytest.raises(SampleTooLong, match=r"The first exchange alone is \d+ tokens, over max_length"):
        build_example(conversation, processor(chatml), max_length=N + 2)


def test_messages_with_typed_content_train_as_llava_turns(chatml):
    typed = [
        {"role": "user", "content": "Read the text: hello world"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello world"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written in the image?"}]},
        {"role": "assistant", "content": "The sign says open."},
    ]
    assert build_example(typed, processor(chatml)) == build_example(IMAGE_IN_SECOND_TURN, processor(chatml))
    # The processor's own template flattens typed content as build_example does.
    rendered = processor(chatml).apply_chat_template(typed[:3], add_generation_prompt=True)
    assert rendered == prompt_text(IMAGE_IN_SECOND_TURN[:3], processor(chatml))


def test_conversation_errors(chatml):
    with pytest.raises(ValueError, match="no assistant"):
        build_example([{"from": "human", "value": "hi"}], processor(chatml))
    with pytest.raises(ValueError, match="Unknown conversation role 'bot'"):
        build_example([{"from": "bot", "value": "hi"}], processor(chatml))
    with pytest.raises(ValueError, match="is not {'type': 'image'}"):
        build_example([{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "hi"}], processor(chatml))


def test_pad_batch_sides(chatml):
    right = pad_batch([[1, 2, 3], [4]], 0, labels=[[1, 2, 3], [-100]])
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[1, 2, 3], [-100, -100, -100]]
    left = pad_batch([[1, 2, 3], [4]], 0, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]] and left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    wide = pad_batch([[1, 2, 3], [4]], 0, labels=[[1, 2, 3], [-100]], multiple_of=4)
    assert wide["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]] and wide["labels"][:, 3].tolist() == [-100, -100]


def test_pack_batch_fills_rows_in_order_with_positions_restarting_per_sequence():
    lengths = [3, 4, 2, 5, 6, 1, 8, 2]
    sequences = [[100 * i + j for j in range(n)] for i, n in enumerate(lengths)]
    batch = pack_batch(sequences, labels=sequences, max_length=8, pad_token_id=0)
    ids, mask, positions, labels = (batch[k].tolist() for k in ("input_ids", "attention_mask", "position_ids", "labels"))
    assert 1 < len(ids) < len(sequences) and len(ids[0]) <= 8
    assert len(ids) * len(ids[0]) <= len(sequences) * max(lengths)  # never more padding than one sequence per row
    rows = []
    for row_ids, row_mask, row_positions, row_labels in zip(ids, mask, positions, labels):
        real = sum(row_mask)
        assert row_mask == [1] * real + [0] * (len(row_mask) - real)  # padding only at the end
        assert row_ids[real:] == [0] * (len(row_ids) - real) and set(row_labels[real:]) <= {IGNORE_INDEX}
        starts = [i for i in range(real) if row_positions[i] == 0]
        spans = list(itertools.pairwise(starts + [real]))
        assert all(row_positions[a:b] == list(range(b - a)) for a, b in spans)
        assert all(row_labels[a] == IGNORE_INDEX and row_labels[a + 1 : b] == row_ids[a + 1 : b] for a, b in spans)
        rows.append([row_ids[a:b] for a, b in spans])
    assert [s for row in rows for s in row] == sequences  # each sequence once, whole, in order
    # A new row only when the next sequence did not fit.
    assert all(sum(map(len, row)) + len(after[0]) > len(ids[0]) for row, after in itertools.pairwise(rows))
    uneven = [[1] * n for n in (1, 2, 2, 2, 2, 2, 3)]  # rows of 7 + 7 tokens, not 11 + 3 in rows of 11, nor 7 rows of 3
    assert pack_batch(uneven, uneven, max_length=12, pad_token_id=0)["input_ids"].shape == (2, 7)
    with pytest.raises(ValueError, match="does not fit rows of max_length 4"):
        pack_batch(sequences, sequences, max_length=4, pad_token_id=0)
