"""Atomic writes of the data formats the assets use, through the project's one helper (`beni_model.files`)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from beni_model.files import atomic_path


def write_parquet_atomic(table: pa.Table, path: Path, **options) -> None:
    """`options` go to `pyarrow.parquet.write_table` (e.g. use_dictionary=False)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **options)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
