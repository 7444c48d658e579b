import base64
import concurrent.futures
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
from PIL import Image

from beni_pipeline.prep.download import DownloadSettings, download_chunk, read_index
from beni_pipeline.prep.images import process_image
from beni_pipeline.prep.ingest import build_manifest, read_chunk
from beni_pipeline.prep.locks import Busy
from tests.conftest import jpeg_bytes

FAST = DownloadSettings(
    workers=2, retries=2, backoff=0.05, read_timeout=0.5, connect_timeout=1.0, max_bytes=300_000, part_size=8, allow_private_networks=True
)


def rows_for(urls: dict[str, str], root: Path | None = None) -> pa.Table:
    """Download rows; `root` is the folder their local files may be read from, as the manifest gives it."""
    roots = pa.array([str(root) if root else None] * len(urls), pa.string())
    return pa.table({"sample_id": list(urls), "url": list(urls.values()), "local_root": roots})


def by_id(index: pa.Table) -> dict[str, dict]:
    return {r["sample_id"]: r for r in index.to_pylist()}


def test_every_fault_lands_in_its_status(fault_server, tmp_path):
    local = tmp_path / "local.jpg"
    local.write_bytes(jpeg_bytes(300, 300))
    expected = {
        "a0": ("ok", "", 200),
        "a1": ("ok", "", 200),
        "notfound": ("failed", "http_error", 404),
        "flaky": ("ok", "", 200),
        "ratelimited": ("ok", "", 200),
        "slow": ("failed", "timeout", 0),
        "truncated": ("failed", "truncated", 200),
        "html": ("failed", "not_an_image", 200),
        "corrupt": ("failed", "decode_error", 200),
        "huge": ("failed", "too_many_pixels", 200),
        "tiny": ("failed", "too_small", 200),
        "big": ("failed", "too_large", 200),
        "loop": ("failed", "too_many_redirects", 0),
        "moved": ("ok", "", 200),
        "tofile": ("failed", "invalid_url", 0),
        "reset": ("failed", "connection_error", 0),
        "refused": ("failed", "connection_error", 0),
        "unanswered": ("failed", "timeout", 0),
        "rotated": ("ok", "", 200),
        "localfile": ("ok", "", 0),
        "fileurl": ("ok", "", 0),
        "missing": ("failed", "missing_file", 0),
        "ftp": ("failed", "scheme_not_allowed", 0),
        "nohost": ("failed", "invalid_url", 0),
        "badipv6": ("failed", "invalid_url", 0),
        "ctrlchar": ("failed", "invalid_url", 0),
    }
    closed = socket_port_closed()
    listener, backlog = socket_never_answering()
    u = fault_server.url
    urls = {
        "a0": f"{u}/img/0.jpg",
        "a1": f"{u}/img/1.jpg",
        "notfound": f"{u}/nothing.jpg",
        "flaky": f"{u}/flaky500",
        "ratelimited": f"{u}/ratelimited",
        "slow": f"{u}/slow.jpg",
        "truncated": f"{u}/truncated.jpg",
        "html": f"{u}/page.jpg",
        "corrupt": f"{u}/corrupt.jpg",
        "huge": f"{u}/huge.png",
        "tiny": f"{u}/tiny.png",
        "big": f"{u}/big.jpg",
        "loop": f"{u}/loop",
        "moved": f"{u}/moved",
        "tofile": f"{u}/tofile",
        "reset": f"{u}/reset.jpg",
        "refused": f"http://127.0.0.1:{closed}/x.jpg",
        "unanswered": f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg",
        "rotated": f"{u}/rotated.jpg",
        "localfile": str(local),
        "fileurl": local.as_uri(),
        "missing": str(tmp_path / "nope.jpg"),
        "ftp": "ftp://example.org/x.jpg",
        "nohost": "http:///x.jpg",
        "badipv6": "http://[::1/x.jpg",
        "ctrlchar": "http://exa\x00mple.org/x.jpg",
    }
    summary = download_chunk(rows_for(urls, tmp_path), tmp_path / "out", FAST)
    for sock in [listener, *backlog]:
        sock.close()
    index = by_id(read_index(tmp_path / "out"))
    got = {k: (r["status"], r["reason"], r["http_status"]) for k, r in index.items()}
    assert got == expected
    assert sum(summary.counts.values()) == len(urls) == summary.fetched
    assert summary.ok == sum(status == "ok" for status, _, _ in expected.values())

    hits = fault_server.hits["/ratelimited"]
    assert len(hits) == 2 and hits[1] - hits[0] >= 0.95  # Retry-After: 1 honoured
    assert len(fault_server.hits["/flaky500"]) == 2
    assert index["rotated"]["width"] == 200 and index["rotated"]["height"] == 400  # EXIF orientation applied

    for sample_id, row in index.items():
        if row["status"] == "ok":
            with open(tmp_path / "out" / row["tar"], "rb") as f:
                f.seek(row["offset"])
                image = Image.open(__import__("io").BytesIO(f.read(row["size"])))
                assert image.size == (row["width"], row["height"])


def socket_port_closed() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def socket_never_answering() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: Linux drops further SYNs, so a connect hangs until it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    backlog = []
    for _ in range(2):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        backlog.append(s)
    time.sleep(0.1)  # let the handshakes of the backlog complete
    return listener, backlog


@pytest.mark.parametrize(
    "mode,size,expected",
    [("center_crop", 64, (64, 64)), ("pad", 64, (64, 64)), ("longest_edge", 100, (100, 50)), ("keep", 64, (400, 200))],
)
def test_resize_modes(tmp_path, mode, size, expected):
    src = tmp_path / "a.jpg"
    src.write_bytes(jpeg_bytes(400, 200))
    settings = DownloadSettings(workers=1, resize_mode=mode, image_size=size, image_format="webp", quality=80)
    download_chunk(rows_for({"x": str(src)}, tmp_path), tmp_path / "out", settings)
    row = read_index(tmp_path / "out").to_pylist()[0]
    assert (row["width"], row["height"]) == expected and row["ext"] == "webp"
    with tarfile.open(tmp_path / "out" / row["tar"]) as tar:
        assert tar.getnames() == ["x.webp"]


def test_complete_chunk_is_a_noop(fault_server, tmp_path):
    urls = {f"id{i}": f"{fault_server.url}/img/{i}.jpg" for i in range(10)}
    download_chunk(rows_for(urls), tmp_path / "out", FAST)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name != ".lock"}  # the lock names its holder
    hits = sum(len(v) for v in fault_server.hits.values())
    summary = download_chunk(rows_for(urls), tmp_path / "out", FAST)
    assert summary.fetched == 0 and summary.ok == 10
    assert sum(len(v) for v in fault_server.hits.values()) == hits
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name != ".lock"} == before


KILL_SCRIPT = """
import sys, pyarrow as pa
from pathlib import Path
from beni_pipeline.prep.download import DownloadSettings, download_chunk
base, out = sys.argv[1], Path(sys.argv[2])
ids = [f"{i:04d}" for i in range(400)]
rows = pa.table({"sample_id": ids, "url": [f"{base}/img/{i % 40}.jpg" for i in range(400)]})
download_chunk(rows, out, DownloadSettings(workers=2, concurrency=4, part_size=10, allow_private_networks=True))
"""


@pytest.mark.parametrize("victim", ["parent", "worker"])
def test_killed_download_resumes_without_loss_or_duplicates(fault_server, tmp_path, victim):
    fault_server.delay = 0.01
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", KILL_SCRIPT, fault_server.url, str(out)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[2], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*-*-*.parquet"))) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, "the download finished or hung before it could be killed"
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children()
    os.kill(proc.pid if victim == "parent" else workers[0].pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    if victim == "worker":  # the parent stops the other workers and fails with the worker's exit code
        assert proc.returncode == 1 and "a download worker failed" in stderr and "(exit code -9)" in stderr, stderr
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE], "workers outlived their parent"
    assert not (out / "index.parquet").exists()
    committed = sum(1 for _ in out.glob("*-*-*.parquet"))

    fault_server.delay = 0.0
    hits_before = sum(len(v) for v in fault_server.hits.values())
    rows = pa.table({"sample_id": [f"{i:04d}" for i in range(400)], "url": [f"{fault_server.url}/img/{i % 40}.jpg" for i in range(400)]})
    # lock_wait_s=0: the kill released the lock
    summary = download_chunk(rows, out, DownloadSettings(workers=2, part_size=10, lock_wait_s=0, allow_private_networks=True))
    index = read_index(out)
    ids = index.column("sample_id").to_pylist()
    assert sorted(ids) == sorted(set(ids)) == rows.column("sample_id").to_pylist()
    assert summary.ok == 400
    assert summary.fetched <= 400 - committed * 10
    assert sum(len(v) for v in fault_server.hits.values()) - hits_before == summary.fetched
    members = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            members += t.getnames()
    assert sorted(members) == sorted(f"{i}.jpg" for i in ids)


@pytest.mark.parametrize("width,height", [(700, 412), (412, 700), (1023, 767), (333, 250)])
def test_center_crop_of_any_shape(tmp_path, width, height):
    src = tmp_path / "a.jpg"
    src.write_bytes(jpeg_bytes(width, height))
    settings = DownloadSettings(workers=1, resize_mode="center_crop", image_size=256)
    summary = download_chunk(rows_for({"x": str(src)}, tmp_path), tmp_path / "out", settings)
    row = read_index(tmp_path / "out").to_pylist()[0]
    assert summary.ok == 1 and (row["width"], row["height"]) == (256, 256)


def test_two_runs_of_one_chunk_never_share_it(fault_server, tmp_path):
    """Two calls on one chunk at the same moment: one downloads, the other waits and finds it complete, or fails
    with the sentence; every ok row holds the very image its URL served, fetched once."""
    fault_server.delay = 0.005
    fault_server.images.update({f"/u/{i}.jpg": jpeg_bytes(64 + i, 48, seed=i) for i in range(120)})
    urls = {f"s{i:03d}": f"{fault_server.url}/u/{i}.jpg" for i in range(120)}
    refused = 0
    for round, wait in enumerate([0, 0, 0, 30, 30]):
        out = tmp_path / f"round{round}"
        settings = DownloadSettings(workers=2, concurrency=4, part_size=16, lock_wait_s=wait, allow_private_networks=True)
        results = _race(functools.partial(download_chunk, rows_for(urls), out, settings))
        assert not [r for r in results if isinstance(r, Exception) and not isinstance(r, Busy)], results
        done = [r for r in results if not isinstance(r, Busy)]
        busy = [str(r) for r in results if isinstance(r, Busy)]
        assert sorted(r.fetched for r in done) == ([120] if busy else [0, 120]), results
        assert all(r.ok == 120 for r in done), results
        assert not (busy and wait), busy
        refused += len(busy)
        for message in busy:
            assert re.fullmatch(
                rf"chunk round{round} is being downloaded by another run \(pid {os.getpid()}\) into .*raise lock_wait_s", message
            )

        hits = {path: len(times) for path, times in fault_server.hits.items() if path.startswith("/u/")}
        assert hits == {f"/u/{i}.jpg": 1 for i in range(120)}
        fault_server.hits.clear()
        index = by_id(read_index(out))
        assert sorted(index) == sorted(urls)
        for sample_id, url in urls.items():
            row = index[sample_id]
            expected = process_image(fault_server.images[url.removeprefix(fault_server.url)], **_image_settings(settings)).data
            with tarfile.open(out / row["tar"]) as tar:
                member = tar.getmember(f"{sample_id}.jpg")
                assert (member.offset_data, member.size) == (row["offset"], row["size"])
                assert tar.extractfile(member).read() == expected
    assert refused  # a caller that would not wait was refused at least once: the calls did overlap


def _race(call) -> list:
    """Start `call` on two threads at the same moment; each one's result or exception."""
    start, results = threading.Barrier(2), [None, None]

    def run(k):
        start.wait()
        try:
            results[k] = call()
        except Exception as e:  # noqa: BLE001 - the caller checks what each raised
            results[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _image_settings(s: DownloadSettings) -> dict:
    names = ["resize_mode", "image_size", "image_format", "quality", "min_side", "max_pixels"]
    return {name: getattr(s, name) for name in names}


# Runs download_chunk and SIGKILLs itself right before the merge's k-th file operation (write, rename or delete).
KILL_MERGE_SCRIPT = """
import os, pathlib, signal, sys
import pyarrow.parquet as pq
from beni_pipeline.prep import download
out, step = pathlib.Path(sys.argv[1]), int(sys.argv[2])
ops = 0

def killed_before_step(fn):
    def op(*args, **kwargs):
        global ops
        ops += 1
        if ops == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return op

consolidate = download._consolidate

def consolidate_then_die(*args):
    os.replace, pathlib.Path.unlink, pq.write_table = map(killed_before_step, (os.replace, pathlib.Path.unlink, pq.write_table))
    return consolidate(*args)

download._consolidate = consolidate_then_die
rows = pq.read_table(sys.argv[3])
download.download_chunk(rows, out, download.DownloadSettings(workers=2, concurrency=4, part_size=20, lock_wait_s=0, allow_private_networks=True))
"""


def test_merge_killed_at_each_step_resumes_to_the_same_bytes(fault_server, tmp_path):
    urls = {f"m{i:03d}": f"{fault_server.url}/img/{i % 40}.jpg" for i in range(60)}
    urls["m999"] = f"{fault_server.url}/nothing.jpg"
    pq.write_table(rows_for(urls), tmp_path / "rows.parquet")

    def merge_killed_at(out: Path, step: int) -> int:
        cmd = [sys.executable, "-c", KILL_MERGE_SCRIPT, str(out), str(step), str(tmp_path / "rows.parquet")]
        return subprocess.run(cmd, check=False, cwd=Path(__file__).parents[2], timeout=120).returncode

    staged = tmp_path / "staged"
    assert merge_killed_at(staged, 1) == -signal.SIGKILL  # fetched and committed every part, then died before merging
    assert not (staged / "index.parquet").exists() and len(list(staged.glob("*-*-*.parquet"))) >= 4

    clean = tmp_path / "clean"
    shutil.copytree(staged, clean)
    hits = sum(len(v) for v in fault_server.hits.values())
    expected = download_chunk(rows_for(urls), clean, FAST)
    assert expected.fetched == 0 and expected.ok == 60 and sum(len(v) for v in fault_server.hits.values()) == hits

    step = 1
    while True:
        out = tmp_path / f"killed{step}"
        shutil.copytree(staged, out)
        if merge_killed_at(out, step) == 0:
            break
        summary = download_chunk(rows_for(urls), out, FAST)
        assert (summary.counts, summary.fetched) == (expected.counts, 0)
        assert _files(out) == _files(clean), f"killed before step {step} of the merge"
        step += 1
    assert step == 1 + 2 + len(list(staged.glob("*-*-*.parquet")))  # write the index, rename it, delete each part
    assert _files(out) == _files(clean)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def reasons(out: Path) -> dict[str, str]:
    return {r["sample_id"]: r["reason"] or r["status"] for r in read_index(out).to_pylist()}


def test_local_files_are_read_only_inside_their_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "in.jpg").write_bytes(jpeg_bytes(64, 64))
    secret = outside / "secret.jpg"
    secret.write_bytes(jpeg_bytes(64, 64, seed=1))
    (root / "link.jpg").symlink_to(secret)
    (root / "linkdir").symlink_to(outside)
    urls = {
        "inside": str(root / "in.jpg"),
        "inside_url": (root / "in.jpg").as_uri(),
        "absolute": str(secret),
        "file_url": secret.as_uri(),
        "dotdot": f"{root}/../outside/secret.jpg",
        "symlink": str(root / "link.jpg"),
        "symlinked_folder": str(root / "linkdir" / "secret.jpg"),
        "other_host": f"file://example.org{root}/in.jpg",
        "nul": f"{root}/in\0.jpg",
        "javascript": "javascript:alert(1)",
        "data": "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(64, 64)).decode(),
    }
    rows = pa.concat_tables([rows_for(urls, root), rows_for({"no_root": str(root / "in.jpg")})])
    download_chunk(rows, tmp_path / "out", DownloadSettings(workers=1))
    assert reasons(tmp_path / "out") == {
        "inside": "ok",
        "inside_url": "ok",
        "absolute": "outside_allowed_roots",
        "file_url": "outside_allowed_roots",
        "dotdot": "outside_allowed_roots",
        "symlink": "outside_allowed_roots",
        "symlinked_folder": "outside_allowed_roots",
        "other_host": "invalid_url",
        "nul": "invalid_url",
        "javascript": "scheme_not_allowed",
        "data": "scheme_not_allowed",
        "no_root": "outside_allowed_roots",
    }


def download_within(seconds: float, rows: pa.Table, out: Path, settings: DownloadSettings, fifos=()) -> None:
    """download_chunk, failing the test when it takes over `seconds`; a worker blocked on one of `fifos` is let go."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(download_chunk, rows, out, settings)
        try:
            future.result(timeout=seconds)
        except TimeoutError:
            for fifo in fifos:
                with contextlib.suppress(OSError):  # no reader: nothing blocks on it
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"the download took over {seconds} s: a worker blocked")


def test_only_regular_files_are_read_and_never_past_the_byte_cap(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(64, 64) + b"\0" * 400_000)
    (tmp_path / "small.jpg").write_bytes(jpeg_bytes(64, 64))
    urls = {n: str(tmp_path / f"{n}.jpg") for n in ["fifo", "folder", "big", "small"]} | {"zero_outside": "/dev/zero"}
    rows = pa.concat_tables([rows_for(urls, tmp_path), rows_for({"zero": "/dev/zero", "urandom": "/dev/urandom"}, Path("/dev"))])
    download_within(60, rows, tmp_path / "out", FAST, fifos=[tmp_path / "fifo.jpg"])
    assert reasons(tmp_path / "out") == {
        "fifo": "not_a_regular_file",
        "folder": "not_a_regular_file",
        "big": "too_large",
        "small": "ok",
        "zero_outside": "outside_allowed_roots",
        "zero": "not_a_regular_file",
        "urandom": "not_a_regular_file",
    }


def test_private_addresses_are_refused_unless_allowed(fault_server, tmp_path):
    port = fault_server.httpd.server_address[1]
    urls = {
        "loopback": f"{fault_server.url}/img/0.jpg",
        "by_name": f"http://localhost:{port}/img/1.jpg",
        "mapped": f"http://[::ffff:127.0.0.1]:{port}/img/2.jpg",
        "unspecified": f"http://0.0.0.0:{port}/img/3.jpg",
        "short_form": f"http://127.1:{port}/img/4.jpg",
        "decimal": f"http://2130706433:{port}/img/5.jpg",
        "link_local": "http://[fe80::1]:9/x.jpg",
        "multicast": "http://224.0.0.1:9/x.jpg",
    }
    download_chunk(rows_for(urls), tmp_path / "default", DownloadSettings(**{**FAST.model_dump(), "allow_private_networks": False}))
    numeric = {"short_form": "invalid_url", "decimal": "invalid_url"}  # aiohttp takes no legacy form of an IPv4 address
    assert reasons(tmp_path / "default") == dict.fromkeys(urls, "private_address") | numeric
    assert not fault_server.hits  # refused before a request was sent

    download_chunk(rows_for(urls), tmp_path / "allowed", FAST)
    allowed = reasons(tmp_path / "allowed")
    assert allowed["loopback"] == allowed["by_name"] == "ok"


def test_every_redirect_hop_is_checked(fault_server, tmp_path):
    port, u = fault_server.httpd.server_address[1], fault_server.url
    settings = DownloadSettings(**{**FAST.model_dump(), "allow_private_networks": False, "allowed_networks": ["127.0.0.1/32"]})
    urls = {
        "allowed": f"{u}/img/0.jpg",
        "redirect_allowed": f"{u}/redirect?to=" + urllib.parse.quote(f"{u}/img/1.jpg"),
        "redirect_private": f"{u}/redirect?to=" + urllib.parse.quote(f"http://127.0.0.2:{port}/img/2.jpg"),
    }
    download_chunk(rows_for(urls), tmp_path / "out", settings)
    assert reasons(tmp_path / "out") == {"allowed": "ok", "redirect_allowed": "ok", "redirect_private": "private_address"}


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"schemes": ["http", "file"]}, r"schemes may hold only http and https, not \['file'\]; local paths need no scheme"),
        ({"allowed_networks": ["10.0.0.0/8", "intranet"]}, r"allowed_networks: 'intranet' is not an IP network; write it as CIDR"),
    ],
)
def test_unsafe_or_unknown_settings_fail_with_a_sentence(setting, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        DownloadSettings(**setting)


def test_a_sources_local_images_are_read_only_inside_its_folder(tmp_path):
    """A LLaVA file names images relative to its folder; one that climbs out of it, or names any other file, is refused."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.jpg").write_bytes(jpeg_bytes(64, 64))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(jpeg_bytes(64, 64, seed=2))
    images = ["images/a.jpg", "../outside/secret.png", str(tmp_path / "outside" / "secret.png"), "file:///etc/hostname", "javascript:a.jpg"]
    answer = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a gradient"}]
    items = [{"id": str(i), "image": image, "conversations": answer} for i, image in enumerate(images)]
    (data / "llava.json").write_text(json.dumps(items))
    manifest = build_manifest([data / "llava.json"], tmp_path / "manifest")
    download_chunk(read_chunk(tmp_path / "manifest", "00000"), tmp_path / "out", DownloadSettings(workers=1))
    got = reasons(tmp_path / "out")
    by_row = {r["row"]: got[r["sample_id"]] for r in manifest.table.to_pylist()}
    assert by_row == {1: "ok", 2: "outside_allowed_roots", 3: "outside_allowed_roots", 4: "outside_allowed_roots", 5: "scheme_not_allowed"}
