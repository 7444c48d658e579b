"""Download one manifest chunk into staged tar parts with a parquet index.

Every row ends in exactly one index row: status "ok" with its image in a tar, or "failed" with a
reason. The rows are split over worker processes (`fetch.py`), each with its own asyncio loop and httpx
requests on aiohttp's transport. A worker commits its results in parts of `part_size` rows: it renames the part's tar into place,
then sends the part's rows here, and the part's parquet is written last, so a killed run leaves only
complete parts behind and the next run fetches just the rows they do not hold.

One run at a time holds a chunk (an flock on its `.lock`), and every run names its parts and temp files with its
own random token, so two runs never share a file and a run cleans up only what dead runs left.
"""

import ipaddress
import json
import logging
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydantic

from beni_pipeline.prep.files import write_parquet_atomic
from beni_pipeline.prep.images import ImageFormat, ResizeMode
from beni_pipeline.prep.locks import exclusive

log = logging.getLogger("beni.download")

INDEX_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("http_status", pa.int32()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("content_sha256", pa.string()),
        ("phash", pa.string()),
        ("tar", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("ext", pa.string()),
    ]
)


class DownloadSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    workers: int = pydantic.Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    concurrency: int = pydantic.Field(64, ge=1, description="requests in flight per worker")
    per_host: int = pydantic.Field(16, ge=1, description="requests in flight per host per worker")
    connect_timeout: float = pydantic.Field(10.0, gt=0)
    read_timeout: float = pydantic.Field(20.0, gt=0)
    retries: int = pydantic.Field(3, ge=0, description="retries on connection errors, timeouts, 429 and 5xx")
    backoff: float = pydantic.Field(0.5, ge=0, description="first retry delay in seconds, doubled each retry")
    max_redirects: int = pydantic.Field(5, ge=0)
    max_bytes: int = pydantic.Field(32 * 2**20, ge=1)
    max_pixels: int = pydantic.Field(64_000_000, ge=1, description="decompression-bomb bound")
    min_side: int = pydantic.Field(16, ge=1)
    resize_mode: ResizeMode = "longest_edge"
    image_size: int = pydantic.Field(512, ge=8)
    image_format: ImageFormat = "jpg"
    quality: int = pydantic.Field(90, ge=1, le=100)
    schemes: list[str] = pydantic.Field(["http", "https"], description="URL schemes fetched, from http and https")
    allow_private_networks: bool = pydantic.Field(
        False, description="fetch from loopback, link-local, private and reserved addresses too (refused by default)"
    )
    allowed_networks: list[str] = pydantic.Field(
        [], description="networks fetched from although not public, as CIDR (e.g. 10.20.0.0/16 for an image server of your own)"
    )
    part_size: int = pydantic.Field(256, ge=1, description="rows per committed part (the resume step)")
    lock_wait_s: float = pydantic.Field(60.0, ge=0, description="seconds to wait for another run holding the same chunk, then fail")

    @pydantic.field_validator("schemes")
    @classmethod
    def _web_schemes(cls, schemes: list[str]) -> list[str]:
        if not set(schemes) <= {"http", "https"}:
            raise ValueError(
                f"schemes may hold only http and https, not {sorted(set(schemes) - {'http', 'https'})}; local paths need no scheme: "
                "they are read inside their source's folder or its image_root"
            )
        return schemes

    @pydantic.field_validator("allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"allowed_networks: {network!r} is not an IP network; write it as CIDR, e.g. 10.20.0.0/16 or fd00::/8"
                ) from None
        return networks


@dataclass(frozen=True)
class DownloadSummary:
    counts: dict[str, int]  # "ok" or the failure reason -> rows, over the whole chunk
    fetched: int  # rows fetched by this call (0 when the chunk was already complete)
    seconds: float
    bytes_in: int

    @property
    def ok(self) -> int:
        return self.counts.get("ok", 0)


def download_chunk(rows: pa.Table, out_dir: Path, settings: DownloadSettings = DownloadSettings()) -> DownloadSummary:
    """Fetch `rows` (columns sample_id, url and, for local files, local_root) into `out_dir`; a complete chunk returns at once.

    A row's local file is read only from inside its `local_root` (the manifest's: the source's folder or image_root);
    a row without one reads no local file. The call holds the chunk from start to end: another call on the same
    folder waits up to `lock_wait_s` for it, then raises locks.Busy, without writing anything."""
    out_dir.mkdir(parents=True, exist_ok=True)
    busy = (
        f"chunk {out_dir.name} is being downloaded by another run (pid {{pid}}) into {out_dir}, still after "
        f"{settings.lock_wait_s:g} s; let that run finish and materialize again (it resumes), or raise lock_wait_s"
    )
    with exclusive(out_dir / ".lock", settings.lock_wait_s, busy) as lock:
        _remove_uncommitted(out_dir)
        done = set(_staged_index(out_dir).column("sample_id").to_pylist())
        ids, urls = rows.column("sample_id").to_pylist(), rows.column("url").to_pylist()
        roots = rows.column("local_root").to_pylist() if "local_root" in rows.column_names else [None] * len(ids)
        todo = [(s, u, r) for s, u, r in zip(ids, urls, roots) if s not in done]
        start = time.perf_counter()
        if todo:
            _run_workers(todo, out_dir, settings, lock)
        seconds = time.perf_counter() - start
        index = _consolidate(out_dir, rows.column("sample_id").to_pylist())
    fetched = {s for s, _, _ in todo}
    return DownloadSummary(
        counts=dict(Counter(r if r else "ok" for r in index.column("reason").to_pylist())),
        fetched=len(todo),
        seconds=seconds,
        bytes_in=sum(b for s, b in zip(index.column("sample_id").to_pylist(), index.column("bytes").to_pylist()) if s in fetched),
    )


def download_chunk_file(manifest_chunk: Path, out_dir: Path, settings: DownloadSettings = DownloadSettings()) -> DownloadSummary:
    """`download_chunk` of the rows in one manifest chunk's parquet: a job that passes paths only, for any engine."""
    return download_chunk(pq.read_table(manifest_chunk), out_dir, settings)


def read_index(out_dir: Path) -> pa.Table:
    return pq.read_table(out_dir / "index.parquet")


def _run_workers(todo: list[tuple[str, str, str | None]], out_dir: Path, settings: DownloadSettings, lock: int) -> None:
    """Run `python -m beni_pipeline.prep.fetch` workers: a plain subprocess imports only that module,
    where a multiprocessing spawn would re-import the caller's whole program (Dagster) in every worker.
    The workers inherit the chunk's lock, so a worker outliving a killed parent (until its watchdog stops
    it) still keeps the next run out."""
    n = min(settings.workers, len(todo))
    token = secrets.token_hex(4)
    messages: queue.Queue = queue.Queue()
    procs = []
    try:
        for i in range(n):
            job = {
                "todo": todo[i::n],
                "out_dir": str(out_dir),
                "settings": settings.model_dump(),
                "prefix": f"{token}-{i:02d}",
                "parent": os.getpid(),
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "beni_pipeline.prep.fetch"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=(lock,),
            )
            threading.Thread(target=_relay, args=(proc, json.dumps(job), messages), daemon=True).start()
            procs.append(proc)
        progress = _Progress(len(todo))
        for _ in range(n):
            message = messages.get()
            while "part" in message:
                _write_part(out_dir / message["part"], message["rows"])
                progress.update(message["rows"])
                message = messages.get()
            if "error" in message:
                raise RuntimeError(f"a download worker failed: {message['error']}")
        progress.report(final=True)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _relay(proc: subprocess.Popen, job: str, messages: queue.Queue) -> None:
    """Send a worker its job, then pass its committed parts on; its last word is "finished" or "error"."""
    proc.stdin.write(job)
    proc.stdin.close()
    last = {}
    for line in proc.stdout:
        message = json.loads(line)
        if "part" in message:
            messages.put(message)
        else:
            last = message
    proc.wait()
    if "finished" not in last:
        last = {"error": f"{last.get('error', 'it exited without a word')} (exit code {proc.returncode})"}
    messages.put(last)


class _Progress:
    def __init__(self, total: int):
        self.total, self.done, self.ok = total, 0, 0
        self.start = self.last = time.perf_counter()

    def update(self, rows: list[dict]) -> None:
        self.done += len(rows)
        self.ok += sum(r["status"] == "ok" for r in rows)
        if time.perf_counter() - self.last > 5:
            self.report()

    def report(self, final: bool = False) -> None:
        self.last = time.perf_counter()
        rate = self.done / max(self.last - self.start, 1e-9)
        eta = "" if final else f", ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s"
        log.info("fetched %d/%d rows (%d ok), %.0f rows/s%s", self.done, self.total, self.ok, rate, eta)


def _write_part(path: Path, rows: list[dict]) -> None:
    write_parquet_atomic(pa.Table.from_pylist(rows, INDEX_SCHEMA), path)


def _part_indexes(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("*-*-*.parquet"))


def _staged_index(out_dir: Path) -> pa.Table:
    """The rows of index.parquet and of the committed parts. A part whose rows index.parquet already holds as they
    are is one that a merge was killed before removing: it counts once."""
    index = read_index(out_dir) if (out_dir / "index.parquet").exists() else INDEX_SCHEMA.empty_table()
    tables = [index]
    for path in _part_indexes(out_dir):
        part = pq.read_table(path)
        merged = index.filter(pc.is_in(index.column("sample_id"), part.column("sample_id")))
        if not merged.sort_by("sample_id").equals(part.sort_by("sample_id")):
            tables.append(part)
    return pa.concat_tables(tables)


def _remove_uncommitted(out_dir: Path) -> None:
    """Drop what a killed run left half-written: temp files, and tars whose parquet never landed. Called only
    under the chunk's lock, so no live run owns any of them."""
    for tmp in out_dir.glob("*.tmp"):
        tmp.unlink()
    referenced = set(_staged_index(out_dir).column("tar").to_pylist())
    for tar in out_dir.glob("*-*-*.tar"):
        if tar.name not in referenced:
            tar.unlink()


def _consolidate(out_dir: Path, expected_ids: list[str]) -> pa.Table:
    """Merge committed parts into one index.parquet sorted by sample_id and check that no row is lost.

    A kill may stop the merge between any two of its steps (write index.parquet atomically, remove each part's
    parquet): every state in between reads back as the same rows, and the next run writes the same index again."""
    parts = _part_indexes(out_dir)
    index = _staged_index(out_dir).sort_by("sample_id")
    ids = index.column("sample_id").to_pylist()
    if len(ids) != len(set(ids)) or set(ids) != set(expected_ids):
        raise RuntimeError(
            f"{out_dir}: the staged index holds {len(set(ids))} distinct of {len(expected_ids)} expected rows "
            f"({len(ids) - len(set(ids))} repeated); delete the folder and re-materialize this partition"
        )
    if parts:
        write_parquet_atomic(index, out_dir / "index.parquet")
        for p in parts:
            p.unlink()
    return index
