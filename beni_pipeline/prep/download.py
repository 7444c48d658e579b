"""Download one manifest chunk into staged tar parts with a parquet index.

Every row ends in exactly one index row: status "ok" with its image in a tar, or "failed" with a
reason. The rows are split over worker processes, each with its own asyncio loop and httpx clients.
A worker decodes and re-encodes each image on its loop: its time goes to image work, and handing
images to threads cost more CPU than it saved (bench/BENCHMARKS.md). Results are committed in parts of
`part_size` rows: the part's tar is renamed into place first and its parquet last, so a killed run
leaves only complete parts behind and the next run fetches just the rows they do not hold.
"""

import asyncio
import email.utils
import io
import itertools
import json
import logging
import os
import queue
import random
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import certifi
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import uvloop

from beni_pipeline.prep.files import write_parquet_atomic
from beni_pipeline.prep.images import ImageFormat, ImageRejected, ProcessedImage, ResizeMode, process_image

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
_POOL_SIZE = 2  # connections per httpx client
MAX_RETRY_AFTER_S = 60.0  # a server asking for longer is treated as failing, not waited on


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
    schemes: list[str] = pydantic.Field(["http", "https", "file"], description="allowed URL schemes")
    part_size: int = pydantic.Field(256, ge=1, description="rows per committed part (the resume step)")


@dataclass(frozen=True)
class DownloadSummary:
    counts: dict[str, int]  # "ok" or the failure reason -> rows, over the whole chunk
    fetched: int  # rows fetched by this call (0 when the chunk was already complete)
    seconds: float
    bytes_in: int

    @property
    def ok(self) -> int:
        return self.counts.get("ok", 0)


class _Failed(Exception):
    def __init__(self, reason: str, http_status: int = 0):
        super().__init__(reason)
        self.reason, self.http_status = reason, http_status


class _Retry(Exception):
    def __init__(self, reason: str, http_status: int = 0, wait: float = 0.0):
        super().__init__(reason)
        self.reason, self.http_status, self.wait = reason, http_status, wait


def download_chunk(rows: pa.Table, out_dir: Path, settings: DownloadSettings = DownloadSettings()) -> DownloadSummary:
    """Fetch `rows` (columns sample_id, url) into `out_dir`; a complete chunk returns at once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_uncommitted(out_dir)
    done = set(_read_index_parts(out_dir).column("sample_id").to_pylist())
    todo = [(s, u) for s, u in zip(rows.column("sample_id").to_pylist(), rows.column("url").to_pylist()) if s not in done]
    start = time.perf_counter()
    if todo:
        _run_workers(todo, out_dir, settings)
    seconds = time.perf_counter() - start
    index = _consolidate(out_dir, rows.column("sample_id").to_pylist())
    fetched = {s for s, _ in todo}
    return DownloadSummary(
        counts=dict(Counter(r if r else "ok" for r in index.column("reason").to_pylist())),
        fetched=len(todo),
        seconds=seconds,
        bytes_in=sum(b for s, b in zip(index.column("sample_id").to_pylist(), index.column("bytes").to_pylist()) if s in fetched),
    )


def read_index(out_dir: Path) -> pa.Table:
    return pq.read_table(out_dir / "index.parquet")


def _run_workers(todo: list[tuple[str, str]], out_dir: Path, settings: DownloadSettings) -> None:
    """Run `python -m beni_pipeline.prep.download` workers: a plain subprocess imports only this module,
    where a multiprocessing spawn would re-import the caller's whole program (Dagster) in every worker."""
    n = min(settings.workers, len(todo))
    attempt = 1 + max((int(p.name.split("-")[0]) for p in out_dir.glob("*-*-*.*")), default=0)
    messages: queue.Queue = queue.Queue()
    procs = []
    try:
        for i in range(n):
            job = {
                "todo": todo[i::n],
                "out_dir": str(out_dir),
                "settings": settings.model_dump(),
                "prefix": f"{attempt:03d}-{i:02d}",
                "parent": os.getpid(),
            }
            proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=_relay, args=(proc, json.dumps(job), messages), daemon=True).start()
            procs.append(proc)
        progress = _Progress(len(todo))
        for _ in range(n):
            message = messages.get()
            while "done" in message:
                progress.update(message["done"], message["ok"])
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
    """Send a worker its job, then pass its progress lines on; its last word is "finished" or "error"."""
    proc.stdin.write(job)
    proc.stdin.close()
    last = {}
    for line in proc.stdout:
        message = json.loads(line)
        if "done" in message:
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

    def update(self, done: int, ok: int) -> None:
        self.done += done
        self.ok += ok
        if time.perf_counter() - self.last > 5:
            self.report()

    def report(self, final: bool = False) -> None:
        self.last = time.perf_counter()
        rate = self.done / max(self.last - self.start, 1e-9)
        eta = "" if final else f", ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s"
        log.info("fetched %d/%d rows (%d ok), %.0f rows/s%s", self.done, self.total, self.ok, rate, eta)


def _worker_main() -> None:
    job = json.loads(sys.stdin.read())
    try:
        uvloop.run(_fetch_all(job["todo"], Path(job["out_dir"]), DownloadSettings(**job["settings"]), job["prefix"], job["parent"]))
        _say({"finished": True})
    except BaseException:
        _say({"error": traceback.format_exc()})
        raise


def _say(message: dict) -> None:
    print(json.dumps(message), flush=True)


async def _fetch_all(todo, out_dir: Path, s: DownloadSettings, prefix: str, parent: int) -> None:
    writer = _PartWriter(out_dir, prefix, s)
    gate = asyncio.Semaphore(s.concurrency)
    hosts: dict[str, _Host] = {}
    # httpcore walks its whole pool on every request event: one pool of 64 connections costs ~5 ms of CPU
    # per request, pools of 2 cost ~1.5 ms (bench/BENCHMARKS.md). So a worker spreads requests over small pools.
    tls = ssl.create_default_context(cafile=certifi.where())  # loading the CA bundle costs ~50 ms: once, not per client
    clients = [
        httpx.AsyncClient(
            verify=tls,
            timeout=httpx.Timeout(s.read_timeout, connect=s.connect_timeout),
            limits=httpx.Limits(max_connections=_POOL_SIZE, max_keepalive_connections=_POOL_SIZE),
            follow_redirects=True,
            max_redirects=s.max_redirects,
        )
        for _ in range(-(-s.concurrency // _POOL_SIZE))
    ]
    turn = itertools.count()

    async def one(sample_id: str, url: str) -> None:
        async with gate:
            status = 0
            try:
                try:
                    parts = urllib.parse.urlsplit(url)
                except ValueError:
                    raise _Failed("invalid_url") from None
                scheme = parts.scheme.lower()
                if (scheme or "file") not in s.schemes:
                    raise _Failed("scheme_not_allowed")
                if scheme in ("", "file"):
                    data = _read_local(url, s.max_bytes)
                else:
                    host = hosts.setdefault(parts.netloc, _Host(s.per_host))
                    data, status = await _fetch(clients[next(turn) % len(clients)], host, url, s)
                image = _process(data, s)
                writer.add(sample_id, status, len(data), image)
            except _Failed as f:
                writer.fail(sample_id, f.reason, f.http_status or status)

    watchdog = asyncio.create_task(_exit_with_parent(parent))
    try:
        await asyncio.gather(*(one(sample_id, url) for sample_id, url in todo))
        writer.commit()
    finally:
        watchdog.cancel()
        for client in clients:
            await client.aclose()


async def _exit_with_parent(parent: int) -> None:
    """A killed parent cannot stop its workers; they stop themselves rather than write on unsupervised."""
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    os._exit(1)


class _Host:
    """Per-host limit and backoff: a 429 or 5xx from a host delays every request to it."""

    def __init__(self, per_host: int):
        self.slots = asyncio.Semaphore(per_host)
        self.not_before = 0.0

    async def wait(self) -> None:
        delay = self.not_before - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def _fetch(client: httpx.AsyncClient, host: _Host, url: str, s: DownloadSettings) -> tuple[bytes, int]:
    for attempt in range(s.retries + 1):
        try:
            async with host.slots:
                await host.wait()
                return await _get(client, url, s.max_bytes)
        except _Retry as r:
            last = r
        except httpx.TooManyRedirects:
            raise _Failed("too_many_redirects") from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):  # no host, control characters, a redirect to a non-HTTP URL
            raise _Failed("invalid_url") from None
        except httpx.TimeoutException:
            last = _Retry("timeout")
        except httpx.TransportError:
            last = _Retry("connection_error")
        if attempt == s.retries or last.wait > MAX_RETRY_AFTER_S:
            break
        delay = max(last.wait, s.backoff * 2**attempt * (0.5 + random.random()))
        host.not_before = max(host.not_before, time.monotonic() + delay)
    raise _Failed(last.reason, last.http_status)


async def _get(client: httpx.AsyncClient, url: str, max_bytes: int) -> tuple[bytes, int]:
    async with client.stream("GET", url) as response:
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retry("http_error", status, _retry_after(response.headers.get("retry-after")))
        if status != 200:
            raise _Failed("http_error", status)
        if int(response.headers.get("content-length") or 0) > max_bytes:
            raise _Failed("too_large", status)
        body = bytearray()
        try:
            async for piece in response.aiter_bytes():
                body += piece
                if len(body) > max_bytes:
                    raise _Failed("too_large", status)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError:
            raise _Retry("truncated", status) from None
        return bytes(body), status


def _retry_after(value: str | None) -> float:
    if not value:
        return 0.0
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def _read_local(url: str, max_bytes: int) -> bytes:
    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url)
    try:
        if path.stat().st_size > max_bytes:
            raise _Failed("too_large")
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise _Failed("missing_file") from None
    except PermissionError:
        raise _Failed("unreadable_file") from None


def _process(data: bytes, s: DownloadSettings) -> ProcessedImage:
    try:
        return process_image(
            data,
            resize_mode=s.resize_mode,
            image_size=s.image_size,
            image_format=s.image_format,
            quality=s.quality,
            min_side=s.min_side,
            max_pixels=s.max_pixels,
        )
    except ImageRejected as e:
        raise _Failed(e.reason) from None
    except Exception:  # a Pillow failure nobody foresaw costs this row, recorded, not the whole chunk
        log.exception("unexpected error while processing an image")
        raise _Failed("processing_error") from None


class _PartWriter:
    """Collects results into `<prefix>-<seq>.tar` + `.parquet` parts, committed every `part_size` rows."""

    def __init__(self, out_dir: Path, prefix: str, s: DownloadSettings):
        self.out_dir, self.prefix, self.part_size, self.ext = out_dir, prefix, s.part_size, s.image_format
        self.seq, self.rows, self.tar, self.file = 0, [], None, None

    def _tar_name(self) -> str:
        return f"{self.prefix}-{self.seq:05d}.tar"

    def add(self, sample_id: str, http_status: int, n_bytes: int, image: ProcessedImage) -> None:
        if self.tar is None:
            # a large buffer turns one write per member into one per megabyte
            self.file = open(self.out_dir / (self._tar_name() + ".tmp"), "wb", buffering=2**20)
            self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        info = tarfile.TarInfo(f"{sample_id}.{self.ext}")
        info.size, info.mode = len(image.data), 0o644
        self.tar.addfile(info, io.BytesIO(image.data))
        data_offset = self.tar.offset - -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self._append(sample_id, "ok", "", http_status, n_bytes, image, self._tar_name(), data_offset, info.size)

    def fail(self, sample_id: str, reason: str, http_status: int) -> None:
        self._append(sample_id, "failed", reason, http_status, 0, None, "", -1, 0)

    def _append(self, sample_id, status, reason, http_status, n_bytes, image, tar, offset, size) -> None:
        self.rows.append(
            {
                "sample_id": sample_id,
                "status": status,
                "reason": reason,
                "http_status": http_status,
                "bytes": n_bytes,
                "width": image.width if image else 0,
                "height": image.height if image else 0,
                "content_sha256": image.content_sha256 if image else "",
                "phash": image.phash if image else "",
                "tar": tar,
                "offset": offset,
                "size": size,
                "ext": self.ext if image else "",
            }
        )
        if len(self.rows) >= self.part_size:
            self.commit()

    def commit(self) -> None:
        if not self.rows:
            return
        name = self._tar_name()
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        part = self.out_dir / name.replace(".tar", ".parquet")
        write_parquet_atomic(pa.Table.from_pylist(self.rows, INDEX_SCHEMA), part)
        _say({"done": len(self.rows), "ok": sum(r["status"] == "ok" for r in self.rows)})
        self.seq, self.rows, self.tar = self.seq + 1, [], None


def _part_indexes(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("*-*-*.parquet"))


def _read_index_parts(out_dir: Path) -> pa.Table:
    tables = [pq.read_table(p) for p in _part_indexes(out_dir)]
    if (out_dir / "index.parquet").exists():
        tables.append(read_index(out_dir))
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def _remove_uncommitted(out_dir: Path) -> None:
    """Drop what a killed run left half-written: temp files, and tars whose parquet never landed."""
    for tmp in out_dir.glob("*.tmp"):
        tmp.unlink()
    referenced = set(_read_index_parts(out_dir).column("tar").to_pylist())
    for tar in out_dir.glob("*-*-*.tar"):
        if tar.name not in referenced:
            tar.unlink()


def _consolidate(out_dir: Path, expected_ids: list[str]) -> pa.Table:
    """Merge committed parts into one index.parquet sorted by sample_id and check that no row is lost."""
    parts = _part_indexes(out_dir)
    index = _read_index_parts(out_dir).sort_by("sample_id")
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


if __name__ == "__main__":
    _worker_main()
