"""The ocr extension's `engine`: PP-OCRv4 reads each image in the processor, and its lines follow the image's tokens
in the prompt exactly where and as training puts a sample's own lines."""

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoProcessor, pipeline

from beni_model.chat import SampleTooLong, build_example, prompt_text
from beni_model.data import DataSettings, collate
from beni_model.ocr import engine
from beni_model.ocr.extension import OcrExtension
from beni_model.training.config import TrainConfig
from tests.model.conftest import processor_of
from tests.model.test_data import write_toy_shards

ENGINE = {"ocr": {"engine": True}}
QUESTION = "What is the total?"


def page(rows: list[tuple[str, str]], size=(480, 300)) -> Image.Image:
    """Black text on white, each row a label at the left and a value at the right."""
    image = Image.new("RGB", size, "white")
    draw, face = ImageDraw.Draw(image), ImageFont.load_default(size=28)
    for i, (label, value) in enumerate(rows):
        draw.text((20, 30 + 80 * i), label, fill="black", font=face)
        draw.text((300, 30 + 80 * i), value, fill="black", font=face)
    return image


INVOICE = [("Invoice", ""), ("Number", "740025"), ("Total", "94.65")]
LINES = ["Invoice", "Number 740025", "Total 94.65"]


def test_rows_put_boxes_in_reading_order():
    def box(left, top, text, height=20, width=60):
        return [[left, top], [left + width, top], [left + width, top + height], [left, top + height]], text, 0.9

    # Two rows, the second row's right box a little higher than its left one, given in no order.
    found = [box(300, 62, "94.65"), box(20, 10, "Invoice"), box(20, 66, "Total"), box(200, 12, "No. 7")]
    assert engine.rows(found) == ["Invoice No. 7", "Total 94.65"]
    assert engine.rows([]) == []


def test_the_engine_reads_printed_lines_in_reading_order():
    blank = Image.new("RGB", (120, 120), "white")
    assert engine.read_lines([page(INVOICE), blank]) == [LINES, []]


def columns(*reads: tuple[str, float]) -> np.ndarray:
    """Recognizer output, one column a read: (character, the space's probability); "" is a blank column."""
    decode = engine.engine().text_rec.postprocess_op
    out = np.zeros((len(reads), len(decode.characters)), dtype=np.float32)
    for row, (character, space) in zip(out, reads):
        row[decode.characters.index(character) if character else 0] = 1.0 - space
        row[decode.space] = max(row[decode.space], space)
    return out


def test_a_space_goes_where_the_recognizer_half_believes_one_and_nowhere_else(monkeypatch):
    decode = engine.engine().text_rec.postprocess_op
    word_gap, letter_gap = engine.SPACE_P * 2, engine.SPACE_P / 5
    line = columns(("I", 0), ("", word_gap), ("a", 0), ("", letter_gap), ("a", 0), ("a", 0), ("", 0), ("m", 0), ("", 0))
    assert decode.line(line)[0] == "I aam"  # repeats merge, a blank splits them, as CTC has it
    # A space the recognizer reads itself stays one space.
    assert decode.line(columns(("a", 0), ("", word_gap), (" ", 0), ("", word_gap), ("b", 0)))[0] == "a b"
    monkeypatch.setattr(engine, "SPACE_P", float("inf"))
    assert decode.line(line)[0] == "Iaam"


def test_the_engine_reads_the_spaces_between_closely_set_words(monkeypatch):
    image = Image.new("RGB", (640, 60), "white")
    draw, face, x = ImageDraw.Draw(image), ImageFont.load_default(size=28), 10
    for word in ("Stacked", "harvest", "review"):  # a space and a half between the words
        draw.text((x, 12), word, fill="black", font=face)
        x += draw.textlength(word, font=face) + 10
    assert engine.read_lines([image]) == [["Stacked harvest review"]]
    monkeypatch.setattr(engine, "SPACE_P", float("inf"))  # the library's decoding drops them
    assert engine.read_lines([image]) != [["Stacked harvest review"]]


def test_without_the_threshold_the_engine_reads_as_the_library_decodes(monkeypatch):
    from rapidocr_onnxruntime import RapidOCR

    library = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)
    images = [page(INVOICE), page([("Stacked harvest review", ""), ("Ines Lopez", "Valley florist")], size=(640, 200))]
    monkeypatch.setattr(engine, "SPACE_P", float("inf"))
    expected = [engine.rows(library(image.convert("RGB"))[0] or []) for image in images]
    assert engine.read_lines(images) == expected


@pytest.fixture(scope="module")
def engine_model(build, tmp_path_factory):
    model, tokenizer = build("siglip", "llama", extensions=ENGINE)
    folder = tmp_path_factory.mktemp("engine")
    model.save_pretrained(folder)
    processor_of(model, tokenizer).save_pretrained(folder)
    return model, folder


def test_the_processor_hands_the_reads_after_the_image_as_training_hands_the_lines(engine_model):
    model, folder = engine_model
    processor = AutoProcessor.from_pretrained(folder)  # the saved processor reads, as the pipeline's will
    conversation = [{"from": "human", "value": f"<image>\n{QUESTION}"}]
    inputs = processor(text=prompt_text(conversation, processor), images=[page(INVOICE)], return_tensors="pt")
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert f"<image>\n{engine.HEADER}\n" + "\n".join(LINES) + f"\n{QUESTION}" in text

    # Training: the sample's own lines ([text, height] pairs), through the same hook the loader calls.
    meta = {"lines": [[line, 28] for line in LINES]}
    trained = build_example(
        [*conversation, {"from": "gpt", "value": "94.65"}], processor, image_text=OcrExtension.image_text(ENGINE["ocr"], meta)
    )
    prompt = inputs["input_ids"][0].tolist()
    assert trained.input_ids[: len(prompt)] == prompt


def test_the_loader_puts_a_samples_lines_or_transcript_after_its_image(engine_model):
    model, folder = engine_model
    processor = AutoProcessor.from_pretrained(folder)
    settings = DataSettings(shards="unused", batch_size=3, image_size=model.config.image_size, extensions=ENGINE)
    buffer = io.BytesIO()
    page([("Total", "94.65")]).save(buffer, format="JPEG")
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "94.65"}]
    samples = [
        {"jpg": buffer.getvalue(), "json": json.dumps({"conversations": turns, **meta})}
        for meta in ({"transcript": "Total 94.65"}, {"lines": [["Total 94.65", 28], ["Paid", 20]]}, {})
    ]
    batch = collate(samples, "image", processor, settings)
    texts = [processor.tokenizer.decode(row) for row in batch["input_ids"]]
    assert f"<image>\n{engine.HEADER}\nTotal 94.65\n{QUESTION}" in texts[0]
    assert f"<image>\n{engine.HEADER}\nTotal 94.65\nPaid\n{QUESTION}" in texts[1]
    assert f"<image>\n{QUESTION}" in texts[2] and engine.HEADER not in texts[2]

    # A stage whose max_length leaves no room for the lines: the loader names the sample and the setting to raise.
    short = DataSettings(
        shards="unused",
        batch_size=3,
        image_size=model.config.image_size,
        extensions=ENGINE,
        max_length=int(batch["attention_mask"][2].sum()),
    )
    with pytest.raises(
        SampleTooLong, match=r"Sample 7 of shard-0.tar: The first exchange alone is \d+ tokens.* Raise the stage's max_length"
    ):
        collate([{**samples[1], "__key__": "7", "__url__": "shard-0.tar"}], "image", processor, short)


def test_the_pipeline_reads_with_the_engine(engine_model):
    _, folder = engine_model
    reader = pipeline("image-text-to-text", model=str(folder))
    messages = [{"role": "user", "content": [{"type": "image", "image": page(INVOICE)}, {"type": "text", "text": QUESTION}]}]
    answer = reader(text=messages, max_new_tokens=4, do_sample=False, min_new_tokens=4, return_full_text=False)[0]["generated_text"]
    processor, model = reader.processor, reader.model
    inputs = processor(
        text=prompt_text([{"from": "human", "value": f"<image>\n{QUESTION}"}], processor), images=[page(INVOICE)], return_tensors="pt"
    )
    assert engine.HEADER in processor.tokenizer.decode(inputs["input_ids"][0])
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)[0, inputs["input_ids"].shape[1] :]
    assert answer == processor.decode(tokens, skip_special_tokens=True)


def test_without_the_engines_packages_the_error_says_what_to_install(monkeypatch, tmp_path):
    engine.engine.cache_clear()
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # as if not installed
    advice = r"in beni's folder, pip install -e '\.\[ocr\]' && pip install --no-deps rapidocr_onnxruntime==1\.4\.4"
    try:
        with pytest.raises(ImportError, match=advice):
            engine.read_lines([page(INVOICE)])
    finally:
        engine.engine.cache_clear()
    # A training run says so before torchrun starts, not at the eval after ten minutes of training.
    shards = write_toy_shards(tmp_path / "shards", samples=8, per_shard=8)
    config = TrainConfig(shards=str(shards), output_dir=str(tmp_path / "out"), text_model="x", vision_model="y", extensions=ENGINE)
    with pytest.raises(ValueError, match=r"The ocr extension's engine needs rapidocr_onnxruntime, not installed: " + advice):
        config.validate()
