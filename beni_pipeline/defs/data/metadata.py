"""Metadata helpers shared by the data assets: count tables and thumbnail previews."""

import base64
import io
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
from PIL import Image


def counts_table(counts: Counter | dict, label: str = "status") -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        [dg.TableRecord({label: k, "rows": v}) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])],
        schema=dg.TableSchema(columns=[dg.TableColumn(label, "string"), dg.TableColumn("rows", "int")]),
    )


def thumbnail_md(image_bytes: bytes, side: int = 96) -> str:
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=70)
    return f"![thumbnail](data:image/jpeg;base64,{base64.b64encode(out.getvalue()).decode()})"


def preview_md(samples: list[tuple[bytes, str]]) -> dg.MarkdownMetadataValue:
    """A markdown table of thumbnails with their text, for a person to judge at a glance."""
    lines = ["| image | text |", "|---|---|"]
    for image_bytes, text in samples:
        lines.append(f"| {thumbnail_md(image_bytes)} | {_cell(text)} |")
    return dg.MetadataValue.md("\n".join(lines))


def rows_md(rows: list[dict]) -> dg.MarkdownMetadataValue:
    if not rows:
        return dg.MetadataValue.md("no rows")
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(str(row[k])) for k in keys) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def length_histogram_md(lengths: np.ndarray, bins: int = 12) -> dg.MarkdownMetadataValue:
    counts, edges = np.histogram(lengths, bins=bins)
    lines = ["| tokens | samples | |", "|---|---|---|"]
    for count, low, high in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"| {low:.0f}-{high:.0f} | {count} | {'#' * round(30 * count / max(counts.max(), 1))} |")
    return dg.MetadataValue.md("\n".join(lines))


def read_member(tar_path: Path, offset: int, size: int) -> bytes:
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:160]
