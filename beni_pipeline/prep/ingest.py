"""Read url+text rows from parquet, csv/tsv, jsonl, LLaVA JSON or an image folder into one manifest.

Each row gets a stable id (a hash of its image reference and text). The manifest is cut into
chunks that become the partitions of the download step; a row keeps its chunk for good, so a
rebuild with new rows only adds chunks.
"""

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

from beni_pipeline.prep.files import write_parquet_atomic

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("conversations", pa.string()),
        ("transcript", pa.string()),  # the text the image shows on one line, where the source names it
        ("lines", pa.string()),  # JSON [[text, centre], ...]: a document's text lines, each centre a fraction of the height
        ("source", pa.string()),
        ("local_root", pa.string()),  # the folder this row's local image must lie in: its source's folder, or image_root
        ("row", pa.int64()),
        ("chunk", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema([("source", pa.string()), ("row", pa.int64()), ("reason", pa.string()), ("url", pa.string())])
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
FORMATS = "parquet, csv, tsv, jsonl, LLaVA .json, or a folder of images with .txt/.json sidecars"


class IngestError(ValueError):
    """A source cannot be read; the message says where and how to fix it."""


class SourceSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    url_column: str = "url"
    caption_column: str = "caption"
    conversations_column: str = "conversations"
    transcript_column: str = pydantic.Field(
        "transcript", description="optional column with the text the image shows on one line (trains the reading head)"
    )
    lines_column: str = pydantic.Field(
        "lines", description="optional column with a document's text lines as [[text, centre as a fraction of the height], ...] (trains the line head)"
    )
    image_root: str | None = pydantic.Field(
        None, description="folder that relative image paths are resolved against (default: the source's folder)"
    )
    chunk_size: int = pydantic.Field(10_000, ge=1, description="manifest rows per download partition")


@dataclass(frozen=True)
class Manifest:
    table: pa.Table  # MANIFEST_SCHEMA, the current rows
    chunks: list[str]  # every chunk key, oldest first
    new_chunks: list[str]  # the chunks this build added
    rejected: Counter  # reason -> rows that could not be used


def build_manifest(sources: list[Path], out_dir: Path, settings: SourceSettings = SourceSettings()) -> Manifest:
    """Normalize `sources` into out_dir/manifest.parquet, out_dir/chunks/<key>.parquet and rejected.parquet."""
    rows, rejected = [], []
    for source in sources:
        good, bad = read_source(source, settings)
        rows += good
        rejected += bad
    seen = set()
    unique = []
    for row in rows:
        if row["sample_id"] in seen:
            rejected.append({"source": row["source"], "row": row["row"], "reason": "duplicate_row", "url": row["url"]})
        else:
            seen.add(row["sample_id"])
            unique.append(row)

    chunk_dir = out_dir / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    assigned = _assigned_chunks(chunk_dir)
    new = [row for row in unique if row["sample_id"] not in assigned]
    first = 1 + max((int(k) for k in assigned.values()), default=-1)
    new_chunks = []
    for i in range(0, len(new), settings.chunk_size):
        key = f"{first + i // settings.chunk_size:05d}"
        for row in new[i : i + settings.chunk_size]:
            row["chunk"] = key
            assigned[row["sample_id"]] = key
        write_parquet_atomic(pa.Table.from_pylist(new[i : i + settings.chunk_size], MANIFEST_SCHEMA), chunk_dir / f"{key}.parquet")
        new_chunks.append(key)
    for row in unique:
        row["chunk"] = assigned[row["sample_id"]]

    table = pa.Table.from_pylist(unique, MANIFEST_SCHEMA)
    write_parquet_atomic(table, out_dir / "manifest.parquet")
    write_parquet_atomic(pa.Table.from_pylist(rejected, REJECTED_SCHEMA), out_dir / "rejected.parquet")
    return Manifest(table, sorted(set(assigned.values())), new_chunks, Counter(r["reason"] for r in rejected))


def read_chunk(manifest_dir: Path, key: str) -> pa.Table:
    return pq.read_table(manifest_dir / "chunks" / f"{key}.parquet")


def read_source(path: Path, settings: SourceSettings) -> tuple[list[dict], list[dict]]:
    """Rows of one source as (usable manifest rows, rejected rows with a reason)."""
    if not path.exists():
        raise IngestError(f"source {path} does not exist; check the path in the `sources` config")
    if path.is_dir():
        records = _read_folder(path)
    elif path.stat().st_size == 0:
        raise IngestError(f"{path} is empty; point `sources` at a file with data")
    else:
        readers = {".parquet": _read_parquet, ".csv": _read_csv, ".tsv": _read_csv, ".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_llava}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise IngestError(f"{path}: unknown format '{path.suffix}'; use {FORMATS}")
        records = reader(path, settings)
    if not records:
        raise IngestError(f"{path} holds no rows; point `sources` at a file with data")
    root = (Path(settings.image_root) if settings.image_root else (path if path.is_dir() else path.parent)).resolve()
    good, bad = [], []
    for line, record in records:
        row, reason = _normalize(record, root, str(path), line)
        if reason:
            bad.append({"source": str(path), "row": line, "reason": reason, "url": str(record.get("url") or "")})
        else:
            good.append(row)
    return good, bad


def _normalize(record: dict, root: Path, source: str, line: int) -> tuple[dict | None, str]:
    ref = record.get("url")
    if not isinstance(ref, str) or not ref.strip():
        return None, "missing_url"
    ref = ref.strip()
    caption = record.get("caption")
    caption = caption.strip() if isinstance(caption, str) else ""
    conversations = record.get("conversations")
    if isinstance(conversations, str) and conversations.strip():
        try:
            conversations = json.loads(conversations)
        except json.JSONDecodeError:
            return None, "bad_conversations"
    if conversations in (None, "", []):
        conversations = ""
    elif _valid_conversations(conversations):
        conversations = json.dumps(conversations, ensure_ascii=False)
    else:
        return None, "bad_conversations"
    if not caption and not conversations:
        return None, "missing_text"
    transcript = record.get("transcript")
    lines = record.get("lines")
    if isinstance(lines, str):
        try:
            lines = json.loads(lines) if lines.strip() else None
        except json.JSONDecodeError:
            return None, "bad_lines"
    if lines is not None and not _valid_lines(lines):
        return None, "bad_lines"
    sample_id = hashlib.blake2b(f"{ref}\n{caption}\n{conversations}".encode(), digest_size=8).hexdigest()
    return {
        "sample_id": sample_id,
        "url": _resolve(ref, root),
        "caption": caption,
        "conversations": conversations,
        "transcript": transcript.strip() or None if isinstance(transcript, str) else None,
        "lines": json.dumps(lines, ensure_ascii=False) if lines else None,
        "source": source,
        "local_root": str(root),
        "row": line,
    }, ""


def _valid_conversations(turns) -> bool:
    return (
        isinstance(turns, list)
        and all(isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str) for t in turns)
        and any(t["from"] == "gpt" for t in turns)
    )


def _valid_lines(lines) -> bool:
    return isinstance(lines, list) and all(
        isinstance(line, list) and len(line) == 2 and isinstance(line[0], str) and isinstance(line[1], int | float) and 0 <= line[1] <= 1
        for line in lines
    )


def _resolve(ref: str, root: Path) -> str:
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", ref) or os.path.isabs(ref):  # a URL of any scheme (data:, javascript:) is no path
        return ref
    return str((root / ref).resolve())


def _renamed(record: dict, settings: SourceSettings) -> dict:
    return {
        "url": record.get(settings.url_column),
        "caption": record.get(settings.caption_column),
        "conversations": record.get(settings.conversations_column),
        "transcript": record.get(settings.transcript_column),
        "lines": record.get(settings.lines_column),
    }


def _check_columns(path: Path, columns: list[str], settings: SourceSettings) -> None:
    have = ", ".join(columns) or "none"
    if settings.url_column not in columns:
        raise IngestError(f"{path} has no column '{settings.url_column}' (it has: {have}); set url_column to the image column")
    if settings.caption_column not in columns and settings.conversations_column not in columns:
        raise IngestError(
            f"{path} has neither a '{settings.caption_column}' nor a '{settings.conversations_column}' column "
            f"(it has: {have}); set caption_column or conversations_column"
        )


def _read_parquet(path: Path, settings: SourceSettings) -> list[tuple[int, dict]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise IngestError(f"{path} is not a readable parquet file ({e}); re-export it as parquet") from None
    _check_columns(path, table.column_names, settings)
    return [(i + 1, _renamed(r, settings)) for i, r in enumerate(table.to_pylist())]


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise IngestError(f"{path}, line {line}: not valid UTF-8 text; re-save the file as UTF-8") from None


def _read_csv(path: Path, settings: SourceSettings) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        _check_columns(path, reader.fieldnames or [], settings)
        return [(reader.line_num, _renamed(r, settings)) for r in reader]
    except csv.Error as e:
        raise IngestError(f"{path}, line {reader.line_num}: malformed {path.suffix[1:]} ({e}); fix that line") from None


def _read_jsonl(path: Path, settings: SourceSettings) -> list[tuple[int, dict]]:
    records, columns = [], set()
    for line, text in enumerate(_decode(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise IngestError(f"{path}, line {line}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise IngestError(f"{path}, line {line}: expected a JSON object per line, got {type(record).__name__}")
        columns.update(record)
        records.append((line, _renamed(record, settings)))
    if records:
        _check_columns(path, sorted(columns), settings)
    return records


def _read_llava(path: Path, settings: SourceSettings) -> list[tuple[int, dict]]:
    try:
        items = json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(items, list):
        raise IngestError(f"{path}: expected a LLaVA JSON list of {{id, image, conversations}} objects; use .jsonl for one object per line")
    return [(i + 1, {"url": item.get("image"), "conversations": item.get("conversations")} if isinstance(item, dict) else {}) for i, item in enumerate(items)]


def _read_folder(path: Path) -> list[tuple[int, dict]]:
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    records = []
    for i, image in enumerate(images, start=1):
        record = {"url": str(image.relative_to(path))}
        if image.with_suffix(".txt").exists():
            record["caption"] = _decode(image.with_suffix(".txt"))
        elif image.with_suffix(".json").exists():
            try:
                sidecar = json.loads(_decode(image.with_suffix(".json")))
            except json.JSONDecodeError as e:
                raise IngestError(f"{image.with_suffix('.json')}, line {e.lineno}: not valid JSON ({e.msg}); fix the sidecar") from None
            record.update({k: sidecar.get(k) for k in ("caption", "conversations", "transcript", "lines")} if isinstance(sidecar, dict) else {})
        records.append((i, record))
    return records


def _assigned_chunks(chunk_dir: Path) -> dict[str, str]:
    assigned = {}
    for path in sorted(chunk_dir.glob("*.parquet")):
        for sample_id in pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist():
            assigned[sample_id] = path.stem
    return assigned

