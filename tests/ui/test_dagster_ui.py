"""The operator's view: `dagster dev` (as `make dev` starts it) on a free localhost port with a temp DAGSTER_HOME and
BENI_DATA, read through headless Chromium (Debian's, installed by `make test`). Runs are launched through Dagster's
GraphQL API, as the UI's buttons do. Screenshots and the `dagster dev` log are kept under test-artifacts/ui/."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient
from playwright.sync_api import Page, expect, sync_playwright

from beni_pipeline.definitions import defs

REPO = Path(__file__).parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

pytestmark = pytest.mark.slow
expect.set_options(timeout=30_000)  # pages load slowly while runs share the 2 cores


@dataclass
class Dagster:
    url: str
    client: DagsterGraphQLClient

    def materialize(self, assets: list[str], config: dict, resources: dict | None = None) -> str:
        run_config = {"ops": {name: {"config": c} for name, c in config.items()}}
        run_config |= {"resources": {name: {"config": c} for name, c in resources.items()}} if resources else {}
        return self.client.submit_job_execution("__ASSET_JOB", asset_selection=assets, run_config=run_config)

    def wait(self, run_id: str, timeout: float = 240) -> DagsterRunStatus:
        deadline = time.monotonic() + timeout
        while (status := self.client.get_run_status(run_id)) not in FINISHED:
            assert time.monotonic() < deadline, f"run {run_id} still {status.value} after {timeout} s"
            time.sleep(0.5)
        return status


@pytest.fixture(scope="module")
def dagster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "BENI_DATA": str(tmp / "data")}
    command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with open(ARTIFACTS / "dagster-dev.log", "w") as log:
        # Its own process group, to stop its runs with it; Ctrl-C (its clean stop) works again where a background shell ignored it.
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_restore_sigint,  # noqa: PLW1509 (the first fixture: no threads started yet)
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_serving(url, process)
            yield Dagster(url, DagsterGraphQLClient("127.0.0.1", port_number=port))
        finally:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1200})
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def source_run(dagster) -> str:
    """source_manifest on a generated corpus of 60 samples in two chunks, started as soon as the UI is up."""
    return dagster.materialize(["source_manifest"], {"source_manifest": {"corpus_samples": 60, "chunk_size": 30}})


@pytest.mark.usefixtures("source_run")  # it runs while this test reads the pages
def test_ui_shows_every_asset_check_job_and_schedule_described(dagster, page):
    definitions = defs()
    specs = definitions.resolve_all_asset_specs()
    assert {spec.group_name for spec in specs} == {"data", "training", "evaluation", "export"}

    page.goto(f"{dagster.url}/asset-groups")
    page.get_by_role("button", name="settings", exact=True).click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    graph = page.locator("foreignObject")
    for name in [spec.group_name for spec in specs] + [spec.key.to_user_string() for spec in specs]:
        expect(graph.get_by_text(name, exact=True).first).to_be_visible()
    page.screenshot(path=ARTIFACTS / "asset-graph.png")

    page.goto(f"{dagster.url}/assets")
    for spec in specs:
        expect(page.get_by_text(" ".join(spec.description.split())[:60])).to_be_visible()
    page.screenshot(path=ARTIFACTS / "catalog.png")

    checks = definitions.resolve_asset_graph().asset_check_keys
    for asset in {check.asset_key for check in checks}:
        page.goto(f"{dagster.url}/assets/{asset.to_user_string()}?view=checks")
        for check in (c for c in checks if c.asset_key == asset):
            expect(page.get_by_text(check.name, exact=True).first).to_be_visible()

    page.goto(f"{dagster.url}/jobs")
    for job in definitions.jobs:
        expect(page.get_by_text(job.name, exact=True).first).to_be_visible()
    page.goto(f"{dagster.url}/automation")
    for automation in [*definitions.schedules, *definitions.sensors]:
        expect(page.get_by_text(automation.name, exact=True).first).to_be_visible()
    page.screenshot(path=ARTIFACTS / "automation.png")


def test_data_assets_materialize_and_say_what_happened(dagster, source_run, page):
    assert dagster.wait(source_run) == DagsterRunStatus.SUCCESS
    tags = {"dagster/asset_partition_range_start": "demo/00000", "dagster/asset_partition_range_end": "demo/00001"}  # both chunks, one run
    build = dagster.client.submit_job_execution("dataset_build", tags=tags)
    status = dagster.wait(build)

    page.goto(f"{dagster.url}/runs/{build}")
    page.get_by_placeholder("Filter…").fill("rows/s")
    expect(page.get_by_text(re.compile(r"fetched 30/30 rows .*\d+ rows/s")).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"hashed 30 rows \(\d+ rows/s\)")).first).to_be_visible()
    page.screenshot(path=ARTIFACTS / "build-run-progress.png")
    assert status == DagsterRunStatus.SUCCESS

    page.goto(f"{dagster.url}/assets/downloaded")
    rows, ok, failed = (int(_metadata(page, key)) for key in ("rows", "ok", "failed"))
    assert rows == 60 and ok + failed == rows and ok > 0
    assert re.search(rf"^ok\s+{ok}$", _metadata(page, "counts_by_status"), re.MULTILINE)
    assert float(_metadata(page, "images_per_s")) > 0
    page.screenshot(path=ARTIFACTS / "downloaded.png", full_page=True)
    _show_markdown(page, "preview", "downloaded-preview.png")

    page.goto(f"{dagster.url}/assets/deduplicated")
    kept, dropped, clusters = (int(_metadata(page, key)) for key in ("kept", "dropped", "clusters"))
    assert kept + dropped == ok and clusters > 0  # the generated corpus plants duplicates
    assert float(_metadata(page, "samples_per_s")) > 0
    page.screenshot(path=ARTIFACTS / "deduplicated.png", full_page=True)
    dialog = _show_markdown(page, "clusters_preview", "deduplicated-clusters.png")
    expect(dialog.get_by_text(re.compile("^KEPT: ")).first).to_be_visible()

    page.goto(f"{dagster.url}/assets/training_shards")
    assert int(_metadata(page, "samples")) == kept
    histogram = _metadata(page, "length_histogram")
    assert histogram.startswith("tokens\tsamples") and "#" in histogram
    page.screenshot(path=ARTIFACTS / "training_shards.png", full_page=True)


def test_errors_a_user_can_cause_read_as_one_sentence(dagster, page, tmp_path):
    missing = tmp_path / "rows.csv"
    cases = {  # name: (op config, resource config, the sentence the run page shows)
        "missing-source": (
            {"source_manifest": {"sources": [str(missing)]}},
            None,
            f"source {missing} does not exist; check the path in the `sources` config",
        ),
        "bad-config": (
            {"source_manifest": {"corpus_samples": 0}},
            None,
            "Invalid config: corpus_samples: Input should be greater than or equal to 1 (got 0); fix it in the launchpad or the run config.",
        ),
    }
    if not torch.cuda.is_available():
        cases["gpu-recipe-without-gpu"] = (
            {"trained_model": {}},
            {"recipe": {"name": "smollm2-siglip"}},
            "Recipe 'smollm2-siglip' needs a CUDA GPU and none is visible: run it on a GPU machine, or pick recipe 'tiny' to train on CPU.",
        )
    runs = {name: dagster.materialize(list(config), config, resources) for name, (config, resources, _) in cases.items()}
    for name, (_, _, sentence) in cases.items():
        assert dagster.wait(runs[name]) == DagsterRunStatus.FAILURE
        page.goto(f"{dagster.url}/runs/{runs[name]}")
        error = page.get_by_text(sentence).first
        expect(error).to_be_visible()
        page.screenshot(path=ARTIFACTS / f"error-{name}.png")
        # the error's first line is the sentence (after the exception's class); Dagster's stack trace comes below it
        assert error.inner_text().strip() == f"dagster._core.definitions.events.Failure: {sentence}"


def _metadata(page: Page, key: str) -> str:
    """The value cell of one row of an asset page's metadata table."""
    row = page.locator(f'tr:has(> td:first-child :text-is("{key}"))')
    expect(row).to_be_visible()
    return row.locator("> td").nth(2).inner_text().strip()


def _show_markdown(page: Page, key: str, screenshot: str):
    page.locator(f'tr:has(> td:first-child :text-is("{key}"))').get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    thumbnails = dialog.locator('img[src^="data:image/jpeg;base64,"]')
    expect(thumbnails.first).to_be_visible()
    assert all(image.evaluate("img => img.complete && img.naturalWidth > 0") for image in thumbnails.all())  # they decode
    dialog.screenshot(path=ARTIFACTS / screenshot)
    return dialog


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"dagster dev exited with {process.returncode}; see {ARTIFACTS / 'dagster-dev.log'}"
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/server_info", timeout=5):
            return
        time.sleep(0.5)
    raise TimeoutError(f"dagster dev did not answer at {url} in {timeout} s; see {ARTIFACTS / 'dagster-dev.log'}")
