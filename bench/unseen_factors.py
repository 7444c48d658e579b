"""What makes the unseen-renderer set hard for a reader that knows every font: Tesseract (scored by the report's
rule) on the two renderers crossed with the two font splits, and on the unseen renderer with one part of its camera
taken out at a time. Every set is drawn from the same seed, so the items match across variants.

    python bench/unseen_factors.py --fonts FONTS [--per-category 40] [--variants ...]

Prints one line per variant: overall accuracy and per category; needs Debian's `tesseract-ocr`.
"""

import argparse
import json
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageFilter

from beni_pipeline.prep import ocr_eval, unseen_eval
from beni_pipeline.prep.fonts import corpus_fonts, split_fonts
from beni_pipeline.prep.tesseract import score


@contextmanager
def patched(obj, name, value):
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


def sharp_jpeg():
    save = Image.Image.save

    def at_95(self, fp, format=None, **kw):  # the camera's JPEG (quality 25-60) at 95; the set's own files unchanged
        return save(self, fp, format, **{**kw, "quality": 95} if format == "JPEG" and kw.get("quality", 100) <= 60 else kw)

    return patched(Image.Image, "save", at_95)


def no_blur():
    apply = Image.Image.filter
    return patched(
        Image.Image, "filter", lambda self, f: self if isinstance(f, ImageFilter.GaussianBlur | ImageFilter.Kernel) else apply(self, f)
    )


def plain_backgrounds():
    return patched(unseen_eval, "pattern", lambda rng, size, base: Image.new("RGB", size, base))


def unseen_renderer_in(root: Path) -> unseen_eval.Fonts:
    """The unseen renderer's three font lists from the corpus's faces instead (handwriting and mono by package style,
    as `Fonts.unseen` takes them from the unseen split)."""
    faces = corpus_fonts(root)
    hand, mono = (set(split_fonts(root, "train", style)) for style in ("hand", "mono"))
    return unseen_eval.Fonts(faces, tuple(f for f in faces if f in hand), tuple(f for f in faces if f in mono))


# The unseen renderer with one part of its camera, or all of it, taken out.
WITHOUT = {"sharp_jpeg": sharp_jpeg, "no_blur": no_blur, "plain_backgrounds": plain_backgrounds, "no_camera": unseen_eval.without_camera}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fonts", type=Path, required=True)
    parser.add_argument("--per-category", type=int, default=40)
    variants = ["same_train_fonts", "same_unseen_fonts", "unseen", "unseen_train_fonts", *WITHOUT]
    parser.add_argument("--variants", nargs="+", default=variants, choices=variants)
    args = parser.parse_args()
    settings = ocr_eval.EvalSetSettings(per_category=args.per_category)
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            if variant.startswith("same_"):
                fonts = corpus_fonts(args.fonts) if variant == "same_train_fonts" else split_fonts(args.fonts, "unseen")
                eval_json = ocr_eval.generate_eval_set(out, replace(settings, fonts=fonts))
            else:
                fonts = unseen_renderer_in(args.fonts) if variant == "unseen_train_fonts" else unseen_eval.Fonts.unseen(args.fonts)
                with WITHOUT[variant]() if variant in WITHOUT else nullcontext():
                    eval_json = ocr_eval.generate_eval_set(out, settings, set(), unseen_eval.categories(fonts), "unseen")
            result = score(eval_json, out)
        by_type = {k: round(100 * v["accuracy"]) for k, v in result["by_type"].items()}
        print(json.dumps({"variant": variant, "accuracy": round(100 * result["accuracy"], 1), "by_type": by_type}), flush=True)


if __name__ == "__main__":
    main()
