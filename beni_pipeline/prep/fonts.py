"""Fonts by Debian package, in two disjoint splits: the training corpus draws only `train` fonts, the unseen-renderer
eval set only `unseen` fonts, so a score on that set is a score on glyphs the model never saw.

The split is by package (auditable: the lists below) and checked by family name (`check_disjoint`), because two
packages can ship the same design. Look-alike designs (Liberation, TeX Gyre and FreeFont all clone Helvetica, Times
and Courier) stay together in `train`. Fetching needs no install: `apt-get download` then `dpkg-deb -x` into a fonts
root, a plain folder that can be copied to a machine without internet:

    python -m beni_pipeline.prep.fonts fetch /path/to/fonts     # or set BENI_FONTS and omit the path
"""

import argparse
import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
from functools import cache
from itertools import zip_longest
from pathlib import Path

from PIL import Image, ImageFont

from beni_pipeline.prep.files import write_text_atomic

# Package -> style. "hand": handwriting-like faces (the handwriting and formula renderers draw from these).
TRAIN_PACKAGES = {
    "fonts-liberation": "sans serif mono",
    "fonts-texgyre": "sans serif mono hand",  # Adventor, Bonum, Chorus, Cursor, Heros, Pagella, Schola, Termes
    "fonts-roboto-unhinted": "sans condensed",  # thin to black
    "fonts-open-sans": "sans",
    "fonts-crosextra-carlito": "sans",
    "fonts-crosextra-caladea": "serif",
    "fonts-linuxlibertine": "serif sans",
    "fonts-ebgaramond": "serif",
    "fonts-hack": "mono",
    "fonts-inconsolata": "mono",
    "fonts-anonymous-pro": "mono",
    "fonts-courier-prime": "mono",
    "fonts-go": "sans mono",
    "fonts-yanone-kaffeesatz": "condensed",
    "fonts-league-spartan": "sans",
    "fonts-cabin": "sans",
    "fonts-quicksand": "sans",
    "fonts-adf-gillius": "sans",
    "fonts-adf-universalis": "sans",
    "fonts-adf-accanthis": "serif",
    "fonts-adf-baskervald": "serif",
    "fonts-comic-neue": "hand",
    "fonts-dkg-handwriting": "hand",
    "fonts-isabella": "hand",
    "fonts-kristi": "hand",
    "fonts-dancingscript": "hand",
    "fonts-lobster": "hand",
    # The widening: every Latin-script package of Debian 13 not in the unseen split, less look-alikes of packages above
    # (croscore, freefont, cmu), faces whose glyphs misread as other letters (wine's symbol face, triod-postnaja's
    # Cyrillic-looking Latin, levien-museum's blank digits, campania, f500), titling or small-capital-only faces
    # (adf-mekanus, bwht, humor-sans) and the largest single families (junicode, elstob).
    "fonts-3270": "mono",
    "fonts-adf-ikarius": "sans",
    "fonts-adf-irianis": "serif",
    "fonts-adf-libris": "sans",
    "fonts-adf-oldania": "serif",
    "fonts-adf-solothurn": "display",
    "fonts-adf-switzera": "sans condensed",
    "fonts-adf-tribun": "serif",
    "fonts-aenigma": "display",
    "fonts-agave": "mono",
    "fonts-apropal": "display",
    "fonts-arapey": "serif",
    "fonts-arkpandora": "sans serif mono",
    "fonts-b612": "sans mono",
    "fonts-bajaderka": "hand",
    "fonts-blankenburg": "display",
    "fonts-cabinsketch": "display",
    "fonts-cardo": "serif",
    "fonts-century-catalogue": "serif",
    "fonts-cherrybomb": "display",
    "fonts-clear-sans": "sans",
    "fonts-comfortaa": "sans",
    "fonts-compagnon": "mono",
    "fonts-dejavu-core": "sans serif mono",
    "fonts-dosis": "sans",
    "fonts-dustin": "display hand",
    "fonts-ecolier-court": "hand",
    "fonts-engadget": "display",
    "fonts-essays1743": "serif",
    "fonts-eurofurence": "sans",
    "fonts-fantasma": "display",
    "fonts-fantasque-sans": "mono",
    "fonts-gamaliel": "display",
    "fonts-georgewilliams": "serif",
    "fonts-havana": "hand",
    "fonts-inter": "sans",
    "fonts-jetbrains-mono": "mono",
    "fonts-joscelyn": "hand",
    "fonts-junction": "sans",
    "fonts-jura": "sans",
    "fonts-karla": "sans",
    "fonts-karmilla": "sans",
    "fonts-kaushanscript": "hand",
    "fonts-klaudia-berenika": "serif",
    "fonts-lato": "sans",
    "fonts-le-murmure": "display condensed",
    "fonts-league-mono": "mono",
    "fonts-leckerli-one": "hand",
    "fonts-lemonada": "display",
    "fonts-lindenhill": "serif",
    "fonts-linex": "sans serif",
    "fonts-lmodern": "serif sans mono",
    "fonts-millimetre": "display",
    "fonts-monofur": "mono",
    "fonts-monoid": "mono",
    "fonts-mononoki": "mono",
    "fonts-mph-2b-damase": "sans",
    "fonts-ocr-a": "mono",
    "fonts-ocr-b": "mono",
    "fonts-okolaks": "sans",
    "fonts-opendyslexic": "sans",
    "fonts-osifont": "sans",
    "fonts-paratype": "sans serif mono",
    "fonts-prociono": "serif",
    "fonts-quattrocento": "serif",
    "fonts-roboto-slab": "serif",
    "fonts-routed-gothic": "sans",
    "fonts-sil-andika": "sans",
    "fonts-sil-charis": "serif",
    "fonts-sil-doulos": "serif",
    "fonts-sjfonts": "hand",
    "fonts-sora": "sans",
    "fonts-staypuft": "display",
    "fonts-stix": "serif",
    "fonts-summersby": "display",
    "fonts-tiresias": "sans",
    "fonts-tuffy": "sans",
    "fonts-uralic": "serif sans",
    "fonts-urw-base35": "sans serif mono",
    "fonts-vollkorn": "serif",
    "fonts-yrsa-rasa": "serif",
}
UNSEEN_PACKAGES = {
    "fonts-cantarell": "sans",
    "fonts-manrope": "sans",
    "fonts-oxygen": "sans",
    "fonts-play": "sans",
    "fonts-beteckna": "sans",
    "fonts-adf-verana": "sans",
    "fonts-averia-gwf": "sans",
    "fonts-averia-sans-gwf": "sans",
    "fonts-averia-serif-gwf": "serif",
    "fonts-fanwood": "serif",
    "fonts-oldstandard": "serif",
    "fonts-goudybookletter": "serif",
    "fonts-sil-gentium": "serif",
    "fonts-adf-berenis": "serif",
    "fonts-adf-romande": "serif",
    "fonts-firacode": "mono",
    "fonts-noto-mono": "mono",
    "fonts-hermit": "mono",
    "fonts-breip": "hand",
    "fonts-femkeklaver": "hand",
    "fonts-rufscript": "hand",
}
SPLITS = {"train": TRAIN_PACKAGES, "unseen": UNSEEN_PACKAGES}
MANIFEST = "manifest.json"
FONT_SUFFIXES = (".ttf", ".otf")
# Every character the renderers draw outside handwritten maths: a face without one of them would draw a box where
# the label says a letter.
NEEDED = string.ascii_letters + string.digits + ".,:;-/()@+%!?'&#$"
# The renderers draw each font file alike, so a package of forty weights would count forty times a one-face package:
# the corpus takes at most this many faces of a package.
FACES_PER_PACKAGE = 8
ABSENT = "\U0010fffd"  # a private-use code point no font maps: its bitmap is the font's "missing glyph"


class FontsMissing(Exception):
    """No fetched fonts where they were looked for."""


def default_root() -> Path | None:
    return Path(os.environ["BENI_FONTS"]) if os.environ.get("BENI_FONTS") else None


def family(path: str | Path) -> str:
    return ImageFont.truetype(str(path), 24).getname()[0]


def glyph(font: ImageFont.FreeTypeFont, ch: str) -> tuple:
    """The bitmap `font` draws for `ch`, comparable with ==."""
    mask = font.getmask(ch)
    return mask.size, Image.Image()._new(mask).tobytes()


def covers(font: ImageFont.FreeTypeFont, chars: str) -> bool:
    """Whether the font draws each of `chars` with a glyph of its own (not its missing-glyph box)."""
    missing = glyph(font, ABSENT)
    return all(glyph(font, ch) != missing for ch in chars if not ch.isspace())


def unusable(path: Path) -> str | None:
    """Why the renderers cannot use a font file, or None."""
    try:
        font = ImageFont.truetype(str(path), 32)
    except OSError as e:
        return f"unreadable: {e}"
    if not covers(font, NEEDED):
        return "lacks ASCII letters, digits or punctuation"
    if all(glyph(font, c) == glyph(font, c.upper()) for c in "aeg"):
        return "capitals only"  # its lower case would be drawn as capitals the label does not have
    return None


def fetch(root: Path, packages: dict[str, str] | None = None, log=print) -> dict:
    """Downloads `packages` (default: both splits) with apt-get, unpacks their fonts under root/<package>/ and writes
    root/manifest.json: {package: {"split", "style", "files": [paths relative to root], "dropped": {file: why}}}.
    Packages already in the manifest are kept. Returns the manifest."""
    packages = packages if packages is not None else {**TRAIN_PACKAGES, **UNSEEN_PACKAGES}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root) if (root / MANIFEST).is_file() else {}
    wanted = [p for p in packages if p not in manifest]
    with tempfile.TemporaryDirectory() as tmp:
        if wanted:
            done = subprocess.run(["apt-get", "download", *wanted], cwd=tmp, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(
                    f"apt-get download failed ({done.stderr.strip().splitlines()[-1:]}): run `apt-get update` on a Debian machine with "
                    "its package registry reachable, or copy a fetched fonts folder here."
                )
        for package in wanted:
            (deb,) = Path(tmp).glob(f"{package}_*.deb")
            unpacked = Path(tmp) / package
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
            shutil.rmtree(root / package, ignore_errors=True)
            files, dropped = [], {}
            for source in sorted(p for p in unpacked.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file()):
                if why := unusable(source):
                    dropped[source.name] = why
                    continue
                target = root / package / source.name
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, target)
                files.append(str(target.relative_to(root)))
            split = next(name for name, listed in SPLITS.items() if package in listed)
            manifest[package] = {"split": split, "style": packages[package], "files": files, "dropped": dropped}
            size = sum((root / f).stat().st_size for f in files)
            log(f"{split:6} {package}: {len(files)} fonts, {size / 1e6:.1f} MB" + (f" ({len(dropped)} dropped)" if dropped else ""))
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    check_disjoint(root)
    return manifest


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FontsMissing(f"No fonts manifest at {path}: run `python -m beni_pipeline.prep.fonts fetch {root}` (or set BENI_FONTS).")
    return json.loads(path.read_text())


def split_fonts(root: str | Path, split: str, style: str | None = None) -> tuple[str, ...]:
    """The font files of the packages that SPLITS[split] lists (and whose style names `style`, when given)."""
    root, listed = Path(root), SPLITS[split]
    manifest = read_manifest(root)
    files = tuple(
        str(root / f)
        for package, entry in sorted(manifest.items())
        if package in listed and (style is None or style in listed[package].split())
        for f in entry["files"]
    )
    if not files:
        raise FontsMissing(f"The fonts manifest at {root} has no {split} fonts{f' of style {style}' if style else ''}: fetch them again.")
    return files


def corpus_fonts(root: str | Path | None) -> tuple[str, ...]:
    """What the corpus and the same-generator set draw with: the train split when `root` holds fetched fonts, at most
    FACES_PER_PACKAGE faces of each package (`faces`), else () (synthetic.py then uses the machine's own fonts, or
    Pillow's built-in one)."""
    if not (root and (Path(root) / MANIFEST).is_file()):
        return ()
    by_package: dict[str, list[str]] = {}
    for path in split_fonts(root, "train"):
        by_package.setdefault(Path(path).parent.name, []).append(path)
    return tuple(face for package in sorted(by_package) for face in faces(by_package[package], FACES_PER_PACKAGE))


def faces(files: list[str], limit: int = FACES_PER_PACKAGE) -> list[str]:
    """Up to `limit` of one package's font files, one family at a time (families and files in name order), so the
    corpus sees a package's designs before its weights."""
    by_family: dict[str, list[str]] = {}
    for path in sorted(files):
        by_family.setdefault(family(path), []).append(path)
    rounds = zip_longest(*(by_family[name] for name in sorted(by_family)))
    return [path for round_ in rounds for path in round_ if path][:limit]


@cache
def families(files: tuple[str, ...]) -> frozenset[str]:
    return frozenset(family(f) for f in files)


def check_disjoint(root: str | Path) -> None:
    """Fails when a font family is in both splits: a package list that lets the unseen set draw a design the corpus has."""
    shared = families(split_fonts(root, "train")) & families(split_fonts(root, "unseen"))
    if shared:
        raise ValueError(
            f"Font families {sorted(shared)} are in both the train and the unseen split at {root}: move their packages into one split."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m beni_pipeline.prep.fonts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["fetch", "list"])
    parser.add_argument("root", nargs="?", type=Path, default=default_root(), help="the fonts root (default: $BENI_FONTS)")
    args = parser.parse_args(argv)
    if args.root is None:
        parser.error("name the fonts root or set BENI_FONTS")
    if args.command == "fetch":
        fetch(args.root)
    manifest = read_manifest(args.root)
    for split in SPLITS:
        files = split_fonts(args.root, split)
        size = sum(Path(f).stat().st_size for f in files)
        print(
            f"{split}: {sum(e['split'] == split for e in manifest.values())} packages, {len(families(files))} families, {len(files)} fonts, {size / 1e6:.1f} MB"
        )
    drawn = corpus_fonts(args.root)
    print(f"the corpus draws {len(drawn)} of the train fonts ({FACES_PER_PACKAGE} at most a package), {len(families(drawn))} families")
    return 0


if __name__ == "__main__":
    sys.exit(main())
