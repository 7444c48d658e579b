"""Atomic writes: a file appears complete under its name, or not at all, whenever the writer is killed."""

import os
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def temp_name(path: Path) -> Path:
    # the pid alone is shared by a process's threads: two writers of one path must never share a temp file
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = temp_name(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
