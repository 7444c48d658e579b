"""Atomic writes: a file appears complete under its name, or not at all, whenever the writer is killed."""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = temp_name(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
