"""A tiny saved beni model served on 127.0.0.1 by the real app under uvicorn, in a thread of the test process."""

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from beni_pipeline.prep.download import DownloadSettings
from beni_pipeline.serve.app import ServeSettings, create_app, load_model
from tests.model.conftest import build, parts  # noqa: F401 (fixtures)
from tests.model.test_evaluate import save_test_model

# The tests' image server is on loopback, which the fetcher refuses by default.
# Small limits, so that tests can cross them with small inputs.
SETTINGS = ServeSettings(
    max_batch=8,
    max_waiting=16,
    max_images=2,
    max_body_bytes=2 * 2**20,
    images=DownloadSettings(retries=0, allow_private_networks=True, min_side=4, max_bytes=300_000, max_pixels=4_000_000),
)


@pytest.fixture(scope="session")
def model_dir(build, tmp_path_factory):  # noqa: F811
    return save_test_model(build, tmp_path_factory.mktemp("served") / "final")


@pytest.fixture(scope="session")
def loaded(model_dir):
    return load_model(model_dir, "cpu")


class Served:
    """A running server: `url` (http://127.0.0.1:port) and the app, until `stop`."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.app = f"http://127.0.0.1:{port}", app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def serve(loaded, name: str = "final", settings: ServeSettings = SETTINGS) -> Served:
    model, tokenizer = loaded
    return Served(create_app(model, tokenizer, name, settings))


@pytest.fixture(scope="module")
def server(loaded):
    served = serve(loaded)
    yield served
    served.stop()


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()
