"""The download worker: one process of `download.download_chunk`, with its own asyncio loop and HTTP transport.

It reads its job (rows, settings, part prefix) as JSON on stdin, fetches and re-encodes every row, and commits
results in parts of `part_size` rows: it renames the part's tar into place, then prints the part's index rows as
one JSON line for the parent, which writes the part's parquet last. Images are decoded and re-encoded on the loop:
handing them to threads cost more CPU than it saved (bench/BENCHMARKS.md). The worker imports no pyarrow (~0.25 s
of CPU) and no pydantic (~70 ms): the parent checks the settings.

Over 400 lines because it is one process's whole program, kept apart from the rest of the package so the worker
imports nothing else: the transport (with its address guard), the retrying fetch, the image checks and the part
commits. The serving `Fetcher` wraps the same functions.
"""

import asyncio
import email.utils
import errno
import functools
import io
import ipaddress
import json
import logging
import os
import random
import ssl
import stat
import sys
import tarfile
import time
import traceback
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import aiohttp
import httpx
import uvloop
from httpx_aiohttp import AiohttpTransport

from beni_pipeline.prep.images import ImageRejected, ProcessedImage, process_image

if TYPE_CHECKING:
    from beni_pipeline.prep.download import DownloadSettings

log = logging.getLogger("beni.download")

MAX_RETRY_AFTER_S = 60.0  # a server asking for longer is treated as failing, not waited on


class _Failed(Exception):
    def __init__(self, reason: str, http_status: int = 0):
        super().__init__(reason)
        self.reason, self.http_status = reason, http_status


class _Retry(Exception):
    def __init__(self, reason: str, http_status: int = 0, wait: float = 0.0):
        super().__init__(reason)
        self.reason, self.http_status, self.wait = reason, http_status, wait


def main() -> None:
    job = json.loads(sys.stdin.read())
    settings = SimpleNamespace(**job["settings"])  # download.DownloadSettings, validated by the parent
    try:
        uvloop.run(_fetch_all(job["todo"], Path(job["out_dir"]), settings, job["prefix"], job["parent"]))
        _say({"finished": True})
    except BaseException:
        _say({"error": traceback.format_exc()})
        raise
    os._exit(0)  # all is on disk and said: tearing the interpreter down would only cost ~0.1 s of CPU


def _say(message: dict) -> None:
    print(json.dumps(message), flush=True)


async def _fetch_all(todo, out_dir: Path, s: "DownloadSettings", prefix: str, parent: int) -> None:
    writer = _PartWriter(out_dir, prefix, s)
    hosts: dict[str, _Host] = {}
    guard = None if s.allow_private_networks else _AddressGuard(s.allowed_networks)
    # httpx requests sent straight to aiohttp's transport: about half the CPU per request of httpx's own transport,
    # and ~30% less again without the client's layer (cookies, auth, hooks), whose one use here would be following
    # redirects (bench/BENCHMARKS.md).
    ssl_context = httpx.create_ssl_context()
    transport = AiohttpTransport(verify=ssl_context, client=functools.partial(_session, s, guard, ssl_context))
    # The transport hands httpx's pool timeout to aiohttp's `connect` (pool wait, DNS, connect and TLS): a connect timeout.
    timeout = httpx.Timeout(s.read_timeout, connect=s.connect_timeout, pool=s.connect_timeout).as_dict()

    async def one(sample_id: str, url: str, root: str | None) -> None:
        status = 0
        try:
            try:
                parts = urllib.parse.urlsplit(url)
            except ValueError:
                raise _Failed("invalid_url") from None
            scheme = parts.scheme.lower()
            if scheme in ("", "file"):
                data = _read_local(parts, url, root, s.max_bytes)
            elif scheme not in s.schemes:
                raise _Failed("scheme_not_allowed")
            else:
                host = hosts.setdefault(parts.netloc, _Host(s.per_host))
                data, status = await _fetch(transport, timeout, guard, host, url, s)
            image = _process(data, s)
            writer.add(sample_id, status, len(data), image)
        except _Failed as f:
            writer.fail(sample_id, f.reason, f.http_status or status)

    pending = iter(todo)

    async def run() -> None:  # `concurrency` of these bound the requests in flight
        for sample_id, url, root in pending:
            await one(sample_id, url, root)

    watchdog = asyncio.create_task(_exit_with_parent(parent))
    try:
        await asyncio.gather(*(run() for _ in range(s.concurrency)))
        writer.commit()
    finally:
        watchdog.cancel()
        await transport.aclose()


class FetchFailed(Exception):
    """A URL or image the fetcher refused; `reason` is the status the download index would record (http_error,
    too_large, private_address, not_an_image, too_many_pixels, ...)."""

    def __init__(self, reason: str, http_status: int = 0):
        super().__init__(reason)
        self.reason, self.http_status = reason, http_status


class Fetcher:
    """The worker's fetch and image checks, one URL at a time, for callers outside the download worker (the server's
    image_url parts): http(s) only, with the settings' limits, retries and address guard. Make it on the loop that uses it."""

    def __init__(self, settings: "DownloadSettings"):
        self.settings = settings
        self.guard = None if settings.allow_private_networks else _AddressGuard(settings.allowed_networks)
        ssl_context = httpx.create_ssl_context()
        self.transport = AiohttpTransport(verify=ssl_context, client=functools.partial(_session, settings, self.guard, ssl_context))
        self.timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout, pool=settings.connect_timeout).as_dict()
        self.hosts: dict[str, _Host] = {}

    async def get(self, url: str) -> bytes:
        """The body at `url`, fetched as the downloader would (`process` checks it as an image); raises FetchFailed."""
        try:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme.lower() not in self.settings.schemes:
                raise _Failed("scheme_not_allowed")
            host = self.hosts.setdefault(parts.netloc, _Host(self.settings.per_host))
            data, _ = await _fetch(self.transport, self.timeout, self.guard, host, url, self.settings)
            return data
        except ValueError:  # urlsplit's: brackets that are no IPv6 address, a port that is no number
            raise FetchFailed("invalid_url") from None
        except _Failed as f:
            raise FetchFailed(f.reason, f.http_status) from None

    def process(self, data: bytes) -> ProcessedImage:
        """Image bytes (fetched, or from elsewhere such as a data: URL) checked and re-encoded as the downloader does,
        within the same byte and pixel limits; raises FetchFailed."""
        try:
            if len(data) > self.settings.max_bytes:
                raise _Failed("too_large")
            return _process(data, self.settings)
        except _Failed as f:
            raise FetchFailed(f.reason) from None

    async def aclose(self) -> None:
        await self.transport.aclose()


def _session(s: "DownloadSettings", guard: "_AddressGuard | None", ssl_context: ssl.SSLContext) -> aiohttp.ClientSession:
    """The session the transport would make, but for the resolver; the transport makes it on the loop at the first request."""
    resolver = guard or aiohttp.DefaultResolver()
    connector = aiohttp.TCPConnector(limit=s.concurrency, keepalive_timeout=5.0, ssl=ssl_context, resolver=resolver)
    return aiohttp.ClientSession(connector=connector)


class _AddressGuard(aiohttp.abc.AbstractResolver):
    """Refuses hosts whose addresses are not public (loopback, link-local, private, multicast, reserved, ...).

    As aiohttp's resolver it sees every address of every host name before aiohttp connects, and aiohttp connects only
    to the addresses it returns, so a name cannot resolve to a public address for the check and a private one for the
    connection. aiohttp resolves no IP literal: `check_host` refuses those before each request and redirect.
    """

    def __init__(self, allowed_networks: list[str]):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]
        self.dns = aiohttp.DefaultResolver()
        self.literals: dict[str, bool] = {}  # host -> refused, for the hosts that are IP literals

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list:
        addresses = await self.dns.resolve(host, port, family)
        if not all(self.allows(a["host"]) for a in addresses):
            raise _Failed("private_address")
        return addresses

    async def close(self) -> None:
        await self.dns.close()

    def check_host(self, host: str) -> None:
        refused = self.literals.get(host)
        if refused is None:
            try:
                refused = not self.allows(host)
            except ValueError:  # a host name: the resolver checks its addresses
                refused = False
            self.literals[host] = refused
        if refused:
            raise _Failed("private_address")

    def allows(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if ip.version == 6:  # an IPv4 address inside IPv6 is judged as itself
            ip = ip.ipv4_mapped or ip.sixtofour or ip
        return (ip.is_global and not ip.is_multicast) or any(ip in network for network in self.allowed)


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


async def _fetch(
    transport: AiohttpTransport, timeout: dict, guard: _AddressGuard | None, host: _Host, url: str, s: "DownloadSettings"
) -> tuple[bytes, int]:
    for attempt in range(s.retries + 1):
        try:
            async with host.slots:
                await host.wait()
                return await _get(transport, timeout, guard, httpx.URL(url), s)
        except _Retry as r:
            last = r
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):  # no host, control characters, a Location that is no URL
            raise _Failed("invalid_url") from None
        except httpx.TransportError as e:
            last = _Retry("timeout" if _is_timeout(e) else "connection_error")
        if attempt == s.retries or last.wait > MAX_RETRY_AFTER_S:
            break
        delay = max(last.wait, s.backoff * 2**attempt * (0.5 + random.random()))
        host.not_before = max(host.not_before, time.monotonic() + delay)
    raise _Failed(last.reason, last.http_status)


async def _get(
    transport: AiohttpTransport, timeout: dict, guard: _AddressGuard | None, url: httpx.URL, s: "DownloadSettings"
) -> tuple[bytes, int]:
    """The body of `url`, following up to `max_redirects` redirects, to http(s) URLs of an allowed scheme and address only."""
    for _ in range(s.max_redirects + 1):
        if guard:
            guard.check_host(url.host)
        response = await transport.handle_async_request(httpx.Request("GET", url, extensions={"timeout": timeout}))
        try:
            if not (response.is_redirect and "location" in response.headers):
                return await _read(response, s.max_bytes)
            url = url.join(response.headers["location"])
        finally:
            await response.aclose()
        if url.scheme not in ("http", "https"):
            raise _Failed("invalid_url")
        if url.scheme not in s.schemes:
            raise _Failed("scheme_not_allowed")
    raise _Failed("too_many_redirects")


async def _read(response: httpx.Response, max_bytes: int) -> tuple[bytes, int]:
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
    except httpx.TransportError as e:
        if _is_timeout(e):
            raise
        raise _Retry("truncated", status) from None
    return bytes(body), status


def _is_timeout(e: httpx.TransportError) -> bool:
    """httpx-aiohttp 0.2 maps every aiohttp connection error, a refused or reset connection too, to ConnectTimeout;
    aiohttp's own timeouts are TimeoutErrors."""
    return isinstance(e, httpx.TimeoutException) and isinstance(e.__cause__, TimeoutError)


def _retry_after(value: str | None) -> float:
    if not value:
        return 0.0
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def _read_local(parts: urllib.parse.SplitResult, url: str, root: str | None, max_bytes: int) -> bytes:
    """A regular file inside `root` (after `..` and symlinks), at most `max_bytes` long.

    The file is opened without blocking (a FIFO would wait for a writer) and checked through its descriptor: the path
    checked could change before the open, the file opened cannot.
    """
    if parts.scheme and parts.netloc not in ("", "localhost"):  # file://host/ names another machine's file
        raise _Failed("invalid_url")
    path = urllib.request.url2pathname(parts.path) if parts.scheme else url
    try:
        real = os.path.realpath(path)
    except ValueError:  # a NUL byte
        raise _Failed("invalid_url") from None
    if root is None or not _inside(real, _real_root(root)):
        raise _Failed("outside_allowed_roots")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise _Failed("missing_file") from None
    except OSError as e:  # ELOOP: the file became a symlink after the check; ENXIO: a socket
        raise _Failed({errno.ELOOP: "outside_allowed_roots", errno.ENXIO: "not_a_regular_file"}.get(e.errno, "unreadable_file")) from None
    try:
        if not _inside(os.readlink(f"/proc/self/fd/{fd}"), _real_root(root)):
            raise _Failed("outside_allowed_roots")
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a device's size says nothing of what it yields (/dev/zero: 0, endless)
            raise _Failed("not_a_regular_file")
        return _read_at_most(fd, max_bytes)
    except OSError:
        raise _Failed("unreadable_file") from None
    finally:
        os.close(fd)


@functools.cache
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _read_at_most(fd: int, max_bytes: int) -> bytes:
    """The file's bytes, or `too_large` as soon as more than `max_bytes` were read, whatever size the file claims."""
    pieces, size = [], 0
    while piece := os.read(fd, min(2**20, max_bytes + 1 - size)):
        pieces.append(piece)
        size += len(piece)
        if size > max_bytes:
            raise _Failed("too_large")
    return b"".join(pieces)


def _process(data: bytes, s: "DownloadSettings") -> ProcessedImage:
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

    def __init__(self, out_dir: Path, prefix: str, s: "DownloadSettings"):
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
        _say({"part": name.replace(".tar", ".parquet"), "rows": self.rows})
        self.seq, self.rows, self.tar = self.seq + 1, [], None


if __name__ == "__main__":
    main()
