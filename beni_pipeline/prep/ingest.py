"""Read url+text rows from parquet, csv/tsv, jsonl, LLaVA JSON or an image folder into one manifest.

Each row gets a stable id (a hash of its image reference and text). The manifest is cut into
chunks that become the partitions of the download step; a row keeps its chunk for good, so a
rebuild with new rows only adds chunks.

Every input row ends as one manifest row or one rejected row (reason and line number in rejected.parquet);
a bad row never fails the file, and is never merged into a neighbour or trimmed. A row is: in csv/tsv, a
record (one physical line, or several when a quoted field holds line breaks); in jsonl, a non-blank line;
in LLaVA json, an item of the list; in a folder, an image. Lines are split at "\n" only. A whole-file
problem (unknown format, no url column, an unreadable header, no row readable at all) is one IngestError.

Over 400 lines because each format needs its own reader (csv/tsv alone must re-read a record line by line to
reject one row, not the file), and all of them feed one row normalization and one rejected-rows record.
"""

import codecs
import csv
import hashlib
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
# A row longer than this is rejected (row_too_large) rather than parsed: far past any caption, and it bounds
# what an unclosed quote can gather before it is given up on.
MAX_ROW_CHARS = 16 * 2**20
# A quoted csv field may hold this many line breaks; a quote still open past them is taken as never closed.
MAX_RECORD_LINES = 256
# What a rejected row's reason means and how to fix it, for the one sentence a wholly unreadable file gets.
PROBLEMS = {
    "bad_encoding": ("not valid UTF-8 text", "re-save the file as UTF-8"),
    "unclosed_quote": ("a quoted field is never closed", "close the quote, or double a quote that is part of the text"),
    "malformed_row": (
        "not valid csv (text after a closing quote, or a carriage return outside quotes)",
        "quote the whole field and double every quote inside it",
    ),
    "wrong_field_count": ("the row has more or fewer fields than the header", "quote fields that contain the delimiter"),
    "row_too_large": (f"the row is longer than {MAX_ROW_CHARS} characters", "shorten it"),
    "bad_json": ("not valid JSON", "write one JSON object per line"),
    "not_an_object": ("not a JSON object", "write one JSON object per line"),
}


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
        "lines",
        description="optional column with a document's text lines as [[text, centre as a fraction of the height], ...] (trains the line head)",
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

    if not unique:  # nothing to download: say so here, not as a download step with no partitions
        out_dir.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(pa.Table.from_pylist(rejected, REJECTED_SCHEMA), out_dir / "rejected.parquet")
        reasons = ", ".join(f"{reason} {n}" for reason, n in Counter(r["reason"] for r in rejected).most_common(3))
        raise IngestError(
            f"none of the {len(rejected)} rows of the sources is usable ({reasons}); "
            f"{out_dir / 'rejected.parquet'} gives each row's line and reason: fix those rows"
        )
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
        readers = {
            ".parquet": _read_parquet,
            ".csv": _read_csv,
            ".tsv": _read_csv,
            ".jsonl": _read_jsonl,
            ".ndjson": _read_jsonl,
            ".json": _read_llava,
        }
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise IngestError(f"{path}: unknown format '{path.suffix}'; use {FORMATS}")
        records = reader(path, settings)
    if not records:
        raise IngestError(f"{path} holds no rows; point `sources` at a file with data")
    root = (Path(settings.image_root) if settings.image_root else (path if path.is_dir() else path.parent)).resolve()
    good, bad = [], []
    for line, record in records:
        row, reason = (None, record) if isinstance(record, str) else _normalize(record, root, str(path), line)
        if reason:
            url = "" if isinstance(record, str) else str(record.get("url") or "")
            bad.append({"source": str(path), "row": line, "reason": reason, "url": url.encode(errors="replace").decode()})
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
    lines = json.dumps(lines, ensure_ascii=False) if lines else None
    transcript = transcript.strip() or None if isinstance(transcript, str) else None
    try:  # a JSON escape of half a surrogate pair is valid JSON but not text
        key = f"{ref}\n{caption}\n{conversations}".encode()
        f"{transcript}{lines}".encode()
    except UnicodeEncodeError:
        return None, "bad_encoding"
    if "\0" in ref:
        return None, "bad_url"  # no path or URL holds one
    sample_id = hashlib.blake2b(key, digest_size=8).hexdigest()
    return {
        "sample_id": sample_id,
        "url": _resolve(ref, root),
        "caption": caption,
        "conversations": conversations,
        "transcript": transcript,
        "lines": lines,
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


def _text_lines(path: Path) -> tuple[list[str], set[int]]:
    """The file's physical lines, ends kept (a quoted csv field keeps its line breaks), and the indices of those
    that are not UTF-8. Those are decoded with surrogateescape so a parser still sees where their row ends, and
    only that row is rejected. Split at "\n" alone: a caption may hold U+2028 or a form feed."""
    parts = path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")
    raw = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    lines, undecodable = [], set()
    for i, line in enumerate(raw):
        try:
            lines.append(line.decode())
        except UnicodeDecodeError:
            lines.append(line.decode(errors="surrogateescape"))
            undecodable.add(i)
    return lines, undecodable


class _Lines:
    """Physical lines handed to csv.reader one at a time, from `next`. A record still open after MAX_RECORD_LINES
    lines or MAX_ROW_CHARS characters is cut off as if the file ended there (`cut` says why), so the reader
    reports it instead of gathering the rest of the file into one field."""

    def __init__(self, lines: list[str]):
        self.lines, self.next = lines, 0
        self.begin()

    def begin(self) -> None:
        self.start, self.chars, self.cut = self.next, 0, ""

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.next >= len(self.lines) or self.next - self.start >= MAX_RECORD_LINES:
            self.cut = "unclosed_quote"
            raise StopIteration
        line = self.lines[self.next]
        if self.chars + len(line) > MAX_ROW_CHARS:
            self.cut = "row_too_large"
            raise StopIteration
        self.next, self.chars = self.next + 1, self.chars + len(line)
        return line


def _read_csv(path: Path, settings: SourceSettings) -> list[tuple[int, dict | str]]:
    """Rows as (first line, record or reason). csv's strict mode turns what it would silently repair (text after a
    closing quote, a quote left open) into errors. A row that fails to parse is rejected as its first line alone
    and parsing resumes on the next line, so an unclosed quote costs one row, not the rows it would swallow; a
    row that parses is one row however many lines it spans, kept or rejected whole (wrong_field_count,
    bad_encoding). A quote inside an unquoted field is kept as written: csv gives it no meaning, and `5" screen`
    is text. Empty lines are not rows."""
    lines, undecodable = _text_lines(path)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_CHARS))  # the default 128 KiB would fail a long caption
    feed = _Lines(lines)
    reader = csv.reader(feed, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)
    header, records = None, []
    while feed.next < len(lines):
        feed.begin()
        if not lines[feed.start].strip("\r\n"):  # as csv sees it: a line of spaces or tabs is a row of blank fields
            feed.next += 1
            continue
        try:
            fields = next(reader)
        except (csv.Error, StopIteration):  # StopIteration: the row's first line alone is too long
            fields = None
        line = feed.start + 1
        reason = ""
        if fields is None:  # past its first line, a row fails only because that line left a quote open
            reason = feed.cut or ("unclosed_quote" if feed.next - feed.start > 1 else "malformed_row")
            feed.next = feed.start + 1  # the lines it ran into are read again as rows of their own
        elif header is not None and len(fields) != len(header):
            reason = "wrong_field_count"  # valid csv, so the row is all of its lines
        elif undecodable and not undecodable.isdisjoint(range(feed.start, feed.next)):
            reason = "bad_encoding"
        if header is None:
            if reason:
                cause, fix = PROBLEMS[reason]
                raise IngestError(f"{path}, line {line}: the header row is unreadable ({cause}); {fix}")
            header = fields
            _check_columns(path, header, settings)
        else:
            records.append((line, reason or _renamed(dict(zip(header, fields)), settings)))
    _fail_if_all_rejected(path, records)
    return records


def _read_jsonl(path: Path, settings: SourceSettings) -> list[tuple[int, dict | str]]:
    records, columns = [], set()
    lines, undecodable = _text_lines(path)
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        if i in undecodable:
            records.append((i + 1, "bad_encoding"))
        elif len(text) > MAX_ROW_CHARS:
            records.append((i + 1, "row_too_large"))
        else:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                records.append((i + 1, "bad_json"))
                continue
            if not isinstance(record, dict):
                records.append((i + 1, "not_an_object"))
                continue
            columns.update(record)
            records.append((i + 1, _renamed(record, settings)))
    _fail_if_all_rejected(path, records)
    if records:
        _check_columns(path, sorted(columns), settings)
    return records


def _fail_if_all_rejected(path: Path, records: list[tuple[int, dict | str]]) -> None:
    """No row of the file parsed: the file is not what its name says (another format, another encoding)."""
    if records and all(isinstance(record, str) for _, record in records):
        line, reason = records[0]
        cause, fix = PROBLEMS[reason]
        raise IngestError(f"{path}, line {line}: {cause}, and no row of the file could be read; {fix}")


def _read_llava(path: Path, settings: SourceSettings) -> list[tuple[int, dict]]:
    try:
        items = json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    if not isinstance(items, list):
        raise IngestError(f"{path}: expected a LLaVA JSON list of {{id, image, conversations}} objects; use .jsonl for one object per line")
    return [
        (i + 1, {"url": item.get("image"), "conversations": item.get("conversations")} if isinstance(item, dict) else {})
        for i, item in enumerate(items)
    ]


def _read_folder(path: Path) -> list[tuple[int, dict | str]]:
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    records = []
    for i, image in enumerate(images, start=1):
        record = {"url": str(image.relative_to(path))}
        text_sidecar, json_sidecar = image.with_suffix(".txt"), image.with_suffix(".json")
        try:
            if text_sidecar.exists():
                record["caption"] = text_sidecar.read_bytes().decode("utf-8-sig")
            elif json_sidecar.exists():
                sidecar = json.loads(json_sidecar.read_bytes().decode("utf-8-sig"))
                if isinstance(sidecar, dict):
                    record.update({k: sidecar.get(k) for k in ("caption", "conversations", "transcript", "lines")})
        except UnicodeDecodeError:
            record = "bad_encoding"
        except json.JSONDecodeError:
            record = "bad_json"
        records.append((i, record))
    return records


def _assigned_chunks(chunk_dir: Path) -> dict[str, str]:
    assigned = {}
    for path in sorted(chunk_dir.glob("*.parquet")):
        for sample_id in pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist():
            assigned[sample_id] = path.stem
    return assigned
