"""Every bad input gets one clear 4xx in OpenAI's error shape, and the server goes on answering."""

import base64
import dataclasses
import json

import httpx
import pytest

from beni_pipeline.prep.download import DownloadSettings
from tests.conftest import jpeg_bytes, png_claiming
from tests.serve.conftest import SETTINGS, health, serve


def post(server, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}, timeout=60, **kwargs
    )


def chat(content, **fields) -> dict:
    return {"model": "final", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


TEXT = {"type": "text", "text": "What is written?"}


def bad_inputs(fault_url: str) -> dict[str, tuple[object, int, str]]:
    """name -> (request body, status, a word the message must contain)"""
    return {
        "malformed JSON": (b'{"model": "final", "messages": [', 400, "JSON"),
        "not an object": (b"[1, 2]", 400, "JSON object"),
        "unknown model": ({**chat("hi"), "model": "gpt-4o"}, 404, "not served"),
        "no messages": ({"model": "final", "messages": []}, 400, "messages"),
        "unknown role": ({"model": "final", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        "ends with the assistant": ({"model": "final", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
        "unknown part type": (chat([{"type": "audio", "audio": "..."}]), 400, "messages[0].content[0] must be a text part"),
        "image part without a URL": (chat([{"type": "image_url"}, TEXT]), 400, "must be a text part"),
        "image marker in text": (chat("look: <image>"), 400, "image_url parts"),
        "bad base64": (chat([image("data:image/jpeg;base64,@@not base64@@"), TEXT]), 400, "base64"),
        "data URL not base64": (chat([image("data:image/jpeg,rawbytes"), TEXT]), 400, "base64"),
        "not an image": (chat([image(data_url(b"hello, I am text")), TEXT]), 400, "not_an_image"),
        "truncated image": (chat([image(data_url(jpeg_bytes(300, 200)[:300])), TEXT]), 400, "decode_error"),
        "too many pixels": (chat([image(data_url(png_claiming(30000, 30000))), TEXT]), 400, "too_many_pixels"),
        "image over the byte cap": (chat([image(data_url(jpeg_bytes(64, 64) + b"\0" * 400_000)), TEXT]), 400, "too_large"),
        "image URL over the byte cap": (chat([image(f"{fault_url}/big.jpg"), TEXT]), 400, "too_large"),
        "image URL not found": (chat([image(f"{fault_url}/missing.jpg"), TEXT]), 400, "http_error (HTTP 404)"),
        "image URL that is a page": (chat([image(f"{fault_url}/page.jpg"), TEXT]), 400, "not_an_image"),
        "file URL": (chat([image("file:///etc/hostname"), TEXT]), 400, "data: URL or an http(s) URL"),
        "redirect to a file": (chat([image(f"{fault_url}/tofile"), TEXT]), 400, "invalid_url"),
        "too many images": (chat([image(data_url(jpeg_bytes(32, 32)))] * 3 + [TEXT]), 400, "at most 2"),
        "prompt over the context": (chat("hello world " * 600), 400, "context of 512"),
        "max_tokens over the context": (chat("hi", max_tokens=600), 400, "context of 512"),
        "negative max_tokens": (chat("hi", max_tokens=-1), 400, "max_tokens"),
        "temperature out of range": (chat("hi", temperature=5), 400, "temperature"),
        "several choices": (chat("hi", n=2), 400, "n"),
        "body over the cap": (chat("x" * (3 * 2**20)), 413, "bytes"),
    }


def test_every_bad_input_gets_one_clear_4xx_and_the_server_goes_on(server, fault_server):
    for name, (body, status, words) in bad_inputs(fault_server.url).items():
        response = post(server, body)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert words in error["message"] and error["message"].endswith("."), (name, error)
        assert error["message"].count(". ") == 0, (name, error)  # one sentence
    assert post(server, chat("hi")).status_code == 200
    assert health(server.url)["active"] == 0


def test_images_from_private_addresses_are_refused_by_default(loaded, fault_server):
    guarded = serve(loaded, settings=dataclasses.replace(SETTINGS, images=DownloadSettings(retries=0)))
    try:
        response = post(guarded, chat([image(f"{fault_server.url}/img/0.jpg"), TEXT]))
        assert response.status_code == 400 and "private_address" in response.json()["error"]["message"]
        assert not fault_server.hits  # refused before any connection
    finally:
        guarded.stop()


@pytest.mark.parametrize("method,path", [("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("GET", "/nothing")])
def test_wrong_routes_are_4xx(server, method, path):
    assert 400 <= httpx.request(method, f"{server.url}{path}").status_code < 500
