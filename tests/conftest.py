import io
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import beni_model  # noqa: F401  (first, so its filters drop third-party log noise from every test's imports)


def jpeg_bytes(width: int, height: int, seed: int = 0, exif_orientation: int | None = None) -> bytes:
    image = Image.radial_gradient("L").resize((width, height)).convert("RGB")
    image.paste((seed * 37 % 256, 90, 160), (0, 0, width // 3, height // 3))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, exif=exif)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


class FaultServer:
    """A real threaded HTTP server on 127.0.0.1 with routes that fail in the ways the web does."""

    def __init__(self):
        self.images = {f"/img/{i}.jpg": jpeg_bytes(320 + 16 * i, 240, seed=i) for i in range(40)}
        self.images["/rotated.jpg"] = jpeg_bytes(400, 200, exif_orientation=6)
        self.images["/tiny.png"] = _png(4, 4)
        self.images["/huge.png"] = png_claiming(30000, 30000)
        self.images["/big.jpg"] = jpeg_bytes(64, 64) + b"\0" * 400_000
        good = jpeg_bytes(300, 200)
        self.images["/corrupt.jpg"] = good[: len(good) // 2]  # a valid header, then the scan stops
        self.hits: dict[str, list[float]] = defaultdict(list)
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                server.hits[path].append(time.monotonic())
                n = len(server.hits[path])
                time.sleep(server.delay)
                if path.startswith("/flaky500") and n == 1:
                    return self._send(500, b"oops", "text/plain")
                if path.startswith("/ratelimited") and n == 1:
                    return self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
                if path.startswith(("/flaky500", "/ratelimited")):
                    return self._send(200, server.images["/img/0.jpg"], "image/jpeg")
                if path == "/slow.jpg":
                    time.sleep(2.0)
                    return self._send(200, server.images["/img/1.jpg"], "image/jpeg")
                if path == "/page.jpg":
                    return self._send(200, b"<html><body>Not found, but 200</body></html>", "image/jpeg")
                if path == "/loop":
                    return self._send(302, b"", "text/plain", {"Location": "/loop"})
                if path == "/moved":
                    return self._send(301, b"", "text/plain", {"Location": "img/0.jpg"})
                if path.startswith("/redirect?to="):  # to any URL, another host's too
                    return self._send(302, b"", "text/plain", {"Location": urllib.parse.unquote(path.split("=", 1)[1])})
                if path == "/tofile":
                    return self._send(302, b"", "text/plain", {"Location": "file:///etc/hostname"})
                if path == "/truncated.jpg":
                    body = server.images["/img/2.jpg"]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    return self._reset()
                if path == "/reset.jpg":
                    return self._reset()
                if path in server.images:
                    return self._send(200, server.images[path], "image/jpeg")
                return self._send(404, b"missing", "text/plain")

            def _send(self, status, body, content_type, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _reset(self):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                self.wfile = io.BytesIO()

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # the reset routes break their own sockets on purpose

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def fault_server():
    server = FaultServer()
    yield server
    server.close()


# The smallest packages of each split that give the unseen set every style it draws: a real fetch in a few seconds.
SMALL_FONT_PACKAGES = {
    "fonts-kristi": "hand",  # train
    "fonts-inconsolata": "mono",  # train
    "fonts-goudybookletter": "serif",  # unseen
    "fonts-hermit": "mono",  # unseen
    "fonts-rufscript": "hand",  # unseen
}


@pytest.fixture(scope="session")
def fonts_root(tmp_path_factory):
    """A fonts root fetched from Debian's registry (prep/fonts.py), or a skip where the registry is out of reach."""
    from beni_pipeline.prep.fonts import fetch

    root = tmp_path_factory.mktemp("fonts")
    try:
        fetch(root, SMALL_FONT_PACKAGES, log=lambda line: None)
    except RuntimeError as e:
        pytest.skip(f"no Debian font packages to fetch here: {e}")
    return root
