"""The README and docs/ are a contract: every shell block runs as written and every python block executes, in a fresh
folder laid out like a checkout (the .venv, dagster_home) with small inputs, so a page that drifts from the code fails."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.model.conftest import build, parts  # noqa: F401 (fixtures)
from tests.model.test_evaluate import save_test_model

REPO = Path(__file__).parents[1]
# The set-up commands build .venv and run the whole graph, the test suite or a server: `make test` is this suite, and
# tests/ui drives the server. Every other command of the README runs below.
SERVE = re.compile(r"^\.venv/bin/beni serve\b")  # servers: each line is started, asked, then stopped (see `serves`)
SETUP = {"make demo", "make test", "make dev", "make TORCH=torch demo"}
DOCS = sorted((REPO / "docs").glob("*.md"))


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of each fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)


def without_setup(block: str) -> tuple[str, set[str]]:
    """The block less its set-up lines, and those lines' commands."""
    kept, setup = [], set()
    for line in block.splitlines():
        command = line.split("#", 1)[0].strip()
        if command.split(" ", 1)[0] == "make":
            setup.add(command)
        else:
            kept.append(line)
    return "\n".join(kept).strip(), setup


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A folder where the README's relative paths mean what they mean in a checkout, on this run's interpreter."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (tmp_path / "dagster_home").mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path / "dagster_home")
    for name in ("BENI_DATA", "BENI_DATASET", "DAGSTER_HOME"):  # the README's defaults, not the caller's
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return tmp_path


def write_my_rows(folder: Path, n: int = 30) -> None:
    """The README's my_rows.parquet: n distinct noise images beside it, under the README's column names."""
    (folder / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{i:02d}.png")
        rows.append({"image_url": f"images/{i:02d}.png", "text": f"noise picture {i} in shade {rng.integers(1000)}"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "my_rows.parquet")


def serves(command: str, cwd: Path) -> None:
    """A `beni serve` line runs as written until it answers /health and /v1/models on its port, then stops on SIGTERM
    (a server never returns by itself)."""
    port = int(re.search(r"--port (\d+)", command).group(1)) if "--port" in command else 8000
    process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, f"{command}\n{process.stdout.read() if process.stdout else ''}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def run(language: str, text: str, cwd: Path) -> subprocess.CompletedProcess:
    command = ["bash", "-euo", "pipefail", "-c", text] if language in ("bash", "sh", "shell") else [sys.executable, "-c", text]
    return subprocess.run(command, cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(checkout, build):  # noqa: F811
    shell = [text for language, text in code_blocks(REPO / "README.md") if language in ("bash", "sh", "shell")]
    setup, runnable = set(), []
    for block in shell:
        text, block_setup = without_setup(block)
        setup |= block_setup
        if text:
            runnable.append(text)
    assert setup == SETUP  # a new set-up command must be run here or named above
    assert runnable
    write_my_rows(checkout)
    for text in runnable:
        if SERVE.match(text):  # a model where the demo publishes one (the demo itself is a set-up command)
            final = checkout / "data" / "datasets" / "demo" / "model" / "final"
            if not final.exists():
                save_test_model(build, final)
            for command in text.splitlines():
                serves(command.split("#", 1)[0].strip(), checkout)
            continue
        done = run("bash", text, checkout)
        assert done.returncode == 0, f"{text}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (checkout / "data" / "datasets" / "my_rows" / "shards" / "index.json").is_file()
    assert not (checkout / "data" / "datasets" / "demo" / "manifest").exists()  # the user's rows never land in the demo's dataset


@pytest.mark.parametrize(
    "page, language, text",
    [(page.name, language, text) for page in DOCS for language, text in code_blocks(page) if language in ("python", "bash", "sh", "shell")],
)
def test_every_docs_example_runs(checkout, page, language, text):
    done = run(language, text, checkout)
    assert done.returncode == 0, f"{page}:\n{text}\n{done.stderr[-3000:]}"
