"""Where the ocr extension's engine puts spaces: on the corpus's own samples (train-split fonts, half photographed, as
the GPU corpus draws them), the share of each sample's true lines that the engine's lines hold, for each threshold on
the recognizer's space probability (beni_model.ocr.engine.SPACE_P; "off" is the library's decoding). Tuned here, on
the corpus, so that the held-out sets stay held out.

    pip install -e '.[ocr]' && pip install --no-deps rapidocr_onnxruntime==1.4.4
    python bench/engine_spaces.py --fonts FONTS [--samples 300] [--thresholds off 0.2 0.1 0.05 0.03 0.02]

A line counts as held when it is in the engine's lines, case and runs of whitespace aside; one-line samples' lines
are their transcripts (mostly one word, so a space put inside a word shows there).
"""

import argparse
import re
import time
from collections import defaultdict

from beni_model.ocr import engine
from beni_pipeline.prep import fonts, synthetic

DOCUMENTS = ("receipt", "form", "memo", "sign")


def normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fonts", required=True, help="`make fonts`' folder: the corpus draws with its train split")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7, help="a corpus seed other than the GPU corpus's")
    parser.add_argument("--thresholds", nargs="+", default=["off", "0.2", "0.1", "0.05", "0.03", "0.02"])
    args = parser.parse_args()

    with synthetic.using_fonts(fonts.corpus_fonts(args.fonts)):
        samples = [synthetic.make_sample(args.seed, i, photos=0.5) for i in range(args.samples)]
    truths = [[text for text, _ in s.lines] if s.lines else [s.transcript] if s.transcript else [] for s in samples]
    groups = [s.kind if s.kind in DOCUMENTS else "one-line" for s in samples]
    table: dict[str, dict[str, str]] = defaultdict(dict)
    for threshold in args.thresholds:
        engine.SPACE_P = float("inf") if threshold == "off" else float(threshold)
        start = time.perf_counter()
        reads = engine.read_lines([s.image for s in samples])
        held, total = defaultdict(int), defaultdict(int)
        for group, truth, lines in zip(groups, truths, reads):
            text = "\n".join(normal(line) for line in lines)
            for line in filter(str.strip, truth):
                for name in (group, "all"):
                    total[name] += 1
                    held[name] += normal(line) in text
        for name in total:
            table[name][threshold] = f"{held[name] / total[name]:.1%} ({held[name]}/{total[name]})"
        print(f"threshold {threshold}: {held['all']}/{total['all']} lines held, {time.perf_counter() - start:.0f} s", flush=True)
    print("\n| lines | " + " | ".join(args.thresholds) + " |\n|---|" + "---|" * len(args.thresholds))
    for name in sorted(table, key=lambda name: (name == "all", name)):
        print(f"| {name} | " + " | ".join(table[name][t] for t in args.thresholds) + " |")


if __name__ == "__main__":
    main()
