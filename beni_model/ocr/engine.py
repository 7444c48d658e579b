"""A reading engine trained on real text, for the `engine` setting: PP-OCRv4 (text detection, angle classifier,
recognizer) as the `rapidocr_onnxruntime` wheel ships it, run by onnxruntime on the CPU in the processor, before the
model. Its lines follow each image's tokens as plain prompt text (`reads_text`), as LayoutLMv3's processor hands its
model Tesseract's words (`apply_ocr`): glyphs no corpus font drew are read by a recognizer trained on real text.
Training hands the LLM the corpus's own lines in the same place and form (`OcrExtension.image_text`)."""

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
from PIL import Image
from transformers.image_transforms import to_pil_image

# rapidocr_onnxruntime without its dependencies: it asks for the GUI build of OpenCV, the headless one does.
PACKAGES = "in beni's folder, pip install -e '.[ocr]' && pip install --no-deps rapidocr_onnxruntime==1.4.4"
HEADER = "Text in the image:"
MODULES = ("rapidocr_onnxruntime", "onnxruntime", "cv2", "pyclipper", "shapely")
# A space goes between two characters where the recognizer gives it at least this probability in the blanks between
# them. Chosen on the corpus's own samples (train-split fonts), not the held-out sets: the lowest that put no space
# inside one-line words (bench/engine_spaces.py, bench/BENCHMARKS.md).
SPACE_P = 0.05


def missing() -> list[str]:
    """The engine's modules this Python cannot import, found without importing them."""
    return [name for name in MODULES if importlib.util.find_spec(name) is None]


@cache
def engine():
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as error:
        raise ImportError(f"The ocr extension's engine reads with PP-OCRv4 from rapidocr_onnxruntime ({error}): {PACKAGES}") from None
    # One onnxruntime thread per image: `read_lines` reads a batch's images side by side.
    read = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)
    read.text_rec.postprocess_op = SpacedDecode(read.text_rec.postprocess_op.character)
    return read


class SpacedDecode:
    """The recognizer's greedy CTC decoding (argmax per column, repeats merged, blanks dropped), as the library's
    decoder, but with the spaces the recognizer leaves out. PP-OCRv4's recognizer learned mostly Chinese, which has
    none: between English words its space often loses to the blank ("Stackedharvestreview"), though it stands out
    of the blanks there and nowhere inside a word."""

    def __init__(self, characters: list[str]):
        self.characters = characters  # the library's: blank first, space last
        self.space = characters.index(" ")

    # The library's signature; the engine never asks for word boxes.
    def __call__(self, preds: np.ndarray, return_word_box: bool = False, **_) -> list[tuple[str, float]]:
        return [self.line(columns) for columns in preds]

    def line(self, columns: np.ndarray) -> tuple[str, float]:
        text, scores, previous, gap = [], [], 0, 0.0
        for column, best in zip(columns, columns.argmax(1)):
            if best == 0:
                gap = max(gap, column[self.space])
            elif best != previous:
                if text and gap >= SPACE_P and text[-1] != " " and best != self.space:
                    text.append(" ")
                text.append(self.characters[best])
                scores.append(column[best])
                gap = 0.0
            previous = best
        return "".join(text), float(np.mean(scores)) if scores else 0.0


def rows(found: list) -> list[str]:
    """The engine's boxes ([corners, text, score]) as lines in reading order: taken by their vertical middles, top
    to bottom, a box joins the row above when its middle falls within that row's first box's height; rows top to
    bottom, boxes in a row left to right."""
    boxes = sorted(
        ((min(y for _, y in corners), max(y for _, y in corners), min(x for x, _ in corners), text) for corners, text, _ in found),
        key=lambda box: (box[0] + box[1]) / 2,
    )
    lines: list[list[tuple]] = []
    for box in boxes:
        middle = (box[0] + box[1]) / 2
        if lines and lines[-1][0][0] <= middle <= lines[-1][0][1]:
            lines[-1].append(box)
        else:
            lines.append([box])
    return [" ".join(text for *_, text in sorted(line, key=lambda box: box[2])) for line in lines]


def read_lines(images: list) -> list[list[str]]:
    """Each image's text lines, in reading order ([] where it reads none); PIL images, or arrays and tensors as
    transformers' processors take them."""
    if not images:
        return []
    read = engine()

    def one(image) -> list[str]:
        image = image if isinstance(image, Image.Image) else to_pil_image(image)
        found, _ = read(image.convert("RGB"))
        return [line for line in rows(found or []) if line.strip()]

    with ThreadPoolExecutor(min(len(images), os.cpu_count() or 1)) as pool:  # onnxruntime lets go of the GIL
        return list(pool.map(one, images))


def reads_text(lines: list[str] | None) -> str:
    """What follows an image's tokens in the prompt: its lines under a header, or nothing where there are none."""
    return f"\n{HEADER}\n" + "\n".join(lines) if lines else ""
