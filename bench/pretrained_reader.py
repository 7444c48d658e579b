"""An outside reader for scale: RapidOCR's PP-OCRv4 text recognizer, trained on real text, reads font_probe's test
texts (the same 500 texts in the unseen split's faces, in its handwriting faces, and in the corpus's faces), as it ships:
lines 48 px high, its own alphabet, greedy decoding; exact match as font_probe scores. It learned nothing of ours, so
the gap between it and font_probe's reader is what reading from fonts alone leaves out.

    pip download --no-deps rapidocr_onnxruntime==1.4.4 && unzip -o rapidocr_onnxruntime-1.4.4-*.whl 'rapidocr_onnxruntime/models/*'
    pip install onnx onnxruntime
    python bench/pretrained_reader.py --fonts FONTS --model rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from font_probe import dataset, draws, unseen_sets
from PIL import Image

from beni_pipeline.prep.fonts import corpus_fonts

HEIGHT, WIDTH = 48, 320  # the recognizer's input


def reader(model: Path):
    alphabet = ["", *next(p.value for p in onnx.load(str(model)).metadata_props if p.key == "character").splitlines(), " "]
    session = onnxruntime.InferenceSession(str(model))

    def read(line: np.ndarray) -> str:
        image = Image.fromarray(line).convert("RGB")
        width = min(WIDTH, max(8, round(image.width * HEIGHT / image.height)))
        pixels = np.zeros((1, 3, HEIGHT, WIDTH), np.float32)
        pixels[0, :, :, :width] = (np.asarray(image.resize((width, HEIGHT), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1).transpose(
            2, 0, 1
        )
        best = session.run(None, {session.get_inputs()[0].name: pixels})[0][0].argmax(-1)
        return "".join(alphabet[c] for i, c in enumerate(best) if c and (i == 0 or c != best[i - 1]))

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fonts", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="ch_PP-OCRv4_rec_infer.onnx from the rapidocr_onnxruntime wheel")
    parser.add_argument("--images", type=int, default=24_000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, tests = draws(args.seed, args.images, args.test)  # font_probe's test texts
    sets = {**unseen_sets(args.fonts, tests, args.seed), "corpus_fonts": dataset(tests, corpus_fonts(args.fonts), f"{args.seed}:own")}
    read = reader(args.model)
    scores = {}
    for name, lines in sets.items():
        reads = [read(line) for line in lines]
        scores[name] = round(100 * sum(a == b for a, b in zip(reads, tests)) / len(tests), 1)
        scores[name + "_caseless"] = round(
            100 * sum(a.replace(" ", "").lower() == b.replace(" ", "").lower() for a, b in zip(reads, tests)) / len(tests), 1
        )
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
