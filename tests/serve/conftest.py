"""A tiny saved beni model served on 127.0.0.1 by the real app under uvicorn, in a thread of the test process."""

import httpx
import pytest

from beni_pipeline.prep.download import DownloadSettings
from beni_pipeline.serve.app import BackgroundServer, ServeSettings, create_app, load_model
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


def serve(loaded, name: str = "final", settings: ServeSettings = SETTINGS) -> BackgroundServer:
    model, processor = loaded
    return BackgroundServer(create_app(model, processor, name, settings))


@pytest.fixture(scope="module")
def server(loaded):
    served = serve(loaded)
    yield served
    served.stop()


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()
