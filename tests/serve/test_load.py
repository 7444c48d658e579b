"""Under load: a full queue answers 503 with Retry-After, a client that hangs up frees its slot, shutdown lets the
answers in flight finish, and a bounded load gets no 5xx with memory flat."""

import concurrent.futures
import dataclasses
import json
import threading
import time

import httpx
import psutil

from tests.serve.conftest import SETTINGS, health, serve

LONG = {"model": "final", "messages": [{"role": "user", "content": "Describe the picture."}], "max_tokens": 480, "temperature": 0}


def post(url: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after(loaded):
    small = serve(loaded, settings=dataclasses.replace(SETTINGS, max_batch=1, max_waiting=1))
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(small.url, {**LONG, "max_tokens": 200}), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1 and set(statuses) == {200, 503}, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]["message"]
        assert post(small.url, {**LONG, "max_tokens": 2}).status_code == 200  # served again once the queue drains
    finally:
        small.stop()


def test_a_client_that_hangs_up_frees_its_slot(server):
    before = health(server.url)["steps"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    wait_for(lambda: health(server.url)["active"] == 0)
    assert health(server.url)["steps"] - before < 200  # dropped long before its 480 tokens
    before = health(server.url)["steps"]
    try:
        post(server.url, LONG, timeout=0.05)  # a plain request whose client gives up
    except httpx.ReadTimeout:
        pass
    wait_for(lambda: health(server.url)["active"] == 0)
    assert health(server.url)["steps"] - before < 400  # not run to its 480 tokens


def test_shutdown_lets_the_answers_in_flight_finish(loaded):
    served = serve(loaded)
    chunks, done = [], threading.Event()

    def read():
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json={**LONG, "max_tokens": 200, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    chunks.append(line)
        done.set()

    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: len(chunks) > 2)
    served.stop()
    reader.join(60)
    assert done.is_set() and chunks[-1] == "data: [DONE]"
    finish = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finish[-1] in ("stop", "length") and "error" not in "".join(chunks)
    try:
        httpx.get(f"{served.url}/health", timeout=2)
        raise AssertionError("the stopped server still answers")
    except httpx.TransportError:
        pass


def test_a_bounded_load_gets_no_5xx_and_memory_stays_flat(server):
    """16 clients (the batch's 8 slots and 8 waiting), each sending requests back to back for two rounds; the
    second round must not grow the process's memory."""
    process = psutil.Process()
    bodies = [{**LONG, "max_tokens": 24, "messages": [{"role": "user", "content": f"Read the text {i}."}]} for i in range(16)]

    def round_of_load() -> list[int]:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return [r.status_code for r in pool.map(lambda body: post(server.url, body), bodies * 3)]

    assert set(round_of_load()) == {200}
    rss = process.memory_info().rss
    assert set(round_of_load()) == {200}
    grown = process.memory_info().rss - rss
    assert grown < 30 * 2**20, f"memory grew {grown / 2**20:.1f} MiB over a round of 48 requests"
    assert health(server.url)["active"] == 0
