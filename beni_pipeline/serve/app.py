"""The OpenAI-compatible HTTP API on Starlette + uvicorn: `/v1/chat/completions` (plain and streamed as server-sent
events), `/v1/models`, `/health`, and the chat page at `/`.

Requests are checked here (JSON, fields, images, model name, context) and answered with one OpenAI-style 4xx error;
generation is the engine's (continuous batching on its own thread).
"""

import asyncio
import base64
import io
import json
import logging
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import httpx
import pydantic
import torch
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from beni_model.evaluate import load_for_eval
from beni_pipeline.prep.download import DownloadSettings
from beni_pipeline.prep.fetch import Fetcher, FetchFailed
from beni_pipeline.serve.engine import Busy, Engine, Sampling, Sequence
from beni_pipeline.serve.inputs import BadRequest, conversation, data_url_bytes, model_inputs

log = logging.getLogger("beni.serve")


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32  # sequences stepped together
    max_waiting: int = 64  # requests queued for a slot; past that, 503 with Retry-After
    max_images: int = 4  # per request
    max_body_bytes: int = 64 * 2**20
    default_max_tokens: int = 256
    retry_after_s: int = 1
    # image_url parts are fetched and checked as the downloader fetches training images (its limits and address
    # guard), and so reach the model exactly as training images did.
    images: DownloadSettings = field(default_factory=lambda: DownloadSettings(retries=1, concurrency=16))


class Message(pydantic.BaseModel):
    role: str
    content: str | list[dict] | None = None  # parts are checked by inputs.conversation, which names the bad one


class ChatRequest(pydantic.BaseModel):
    model: str
    messages: list[Message] = pydantic.Field(min_length=1)
    max_tokens: int | None = pydantic.Field(None, ge=1)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)
    temperature: float = pydantic.Field(1.0, ge=0, le=2)
    top_p: float = pydantic.Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    n: int = pydantic.Field(1, ge=1, le=1, description="one choice per request")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(model_dir: str | Path, device: str | None = None, dtype: str = "float32"):
    """(model, processor) of a saved beni model, a quantized export of one, or a LLaVA export, in `dtype`.

    float32 by default, with TF32 off: a batch then answers exactly as `generate` answers each request alone. In bf16,
    padded, batched kernels round differently from a lone request's and can flip a greedy near-tie (bench/BENCHMARKS.md).
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    if dtype == "float32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return load_for_eval(model_dir, device, DTYPES[dtype])


def create_app(model, processor, model_name: str, settings: ServeSettings = ServeSettings(), engine=Engine) -> Starlette:
    """The app; `engine` is the class that generates (Engine; bench/serve.py passes its per-request peer)."""
    context = model.config.text_config.max_position_embeddings
    state = {}

    @asynccontextmanager
    async def lifespan(app):
        state["engine"] = engine(model, processor.tokenizer, settings.max_batch, settings.max_waiting)
        state["fetcher"] = Fetcher(settings.images)
        try:
            yield
        finally:
            await asyncio.to_thread(state["engine"].stop)
            await state["fetcher"].aclose()

    async def image_bytes(url: str) -> bytes:
        fetcher = state["fetcher"]
        if not url.startswith("data:") and url.split(":", 1)[0].lower() not in ("http", "https"):
            raise BadRequest("An image_url must be a base64 data: URL or an http(s) URL.", code="invalid_image_url")
        try:
            data = data_url_bytes(url) if url.startswith("data:") else await fetcher.get(url)
            return (await asyncio.to_thread(fetcher.process, data)).data  # decoding off the loop
        except FetchFailed as e:
            image = "A data: URL image" if url.startswith("data:") else f"The image {url[:100]!r}"
            status = f" (HTTP {e.http_status})" if e.http_status else ""
            raise BadRequest(f"{image} was refused: {e.reason}{status}; send a decodable image within the limits.", code=e.reason) from None

    async def prepare(request: Request) -> tuple[ChatRequest, Sequence, asyncio.Queue]:
        body = await _read_body(request, settings.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"The request body is not valid JSON ({e}): send a JSON object.", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise BadRequest("The request body must be a JSON object with model and messages.", code="invalid_json")
        try:
            chat_request = ChatRequest.model_validate(payload)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise BadRequest(f"{where or 'The body'}: {first['msg']}.", where or None) from None
        if chat_request.model != model_name:
            raise BadRequest(f"The model {chat_request.model!r} is not served here; use {model_name!r}.", "model", "model_not_found", 404)
        chat = conversation([m.model_dump() for m in chat_request.messages], settings.max_images)
        images = await asyncio.gather(*(image_bytes(url) for url in chat.image_urls))
        inputs = await asyncio.to_thread(model_inputs, chat, images, processor)
        room = context - len(inputs.input_ids)
        wanted = chat_request.max_completion_tokens or chat_request.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise BadRequest(
                f"The prompt is {len(inputs.input_ids)} tokens and asks for {wanted or 1} more, over the model's context of {context} "
                "tokens: shorten the messages or max_tokens.",
                "messages",
                "context_length_exceeded",
            )
        stop = [chat_request.stop] if isinstance(chat_request.stop, str) else chat_request.stop or []
        sampling = Sampling(
            wanted or min(settings.default_max_tokens, room),
            chat_request.temperature,
            chat_request.top_p,
            [s for s in stop if s],
            chat_request.seed,
        )
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        sequence = Sequence(
            inputs.input_ids, inputs.pixel_values, sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        )
        try:
            state["engine"].submit(sequence)
        except Busy as e:
            raise BadRequest(f"The server is busy ({e}): retry after {settings.retry_after_s} s.", code="busy", status=503) from None
        return chat_request, sequence, events

    async def chat_completions(request: Request):
        chat_request, sequence, events = await prepare(request)
        reply_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        usage = {"prompt_tokens": len(sequence.input_ids)}
        if chat_request.stream:
            include_usage = bool((chat_request.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(sequence, events, reply_id, created, model_name, usage, include_usage), media_type="text/event-stream"
            )
        if (answer := await _collect(request, sequence, events)) is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        text, finish = answer
        usage["total_tokens"] = usage["prompt_tokens"] + finish["completion_tokens"]
        return JSONResponse(
            {
                "id": reply_id,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish["finish"]}],
                "usage": {**usage, "completion_tokens": finish["completion_tokens"]},
            }
        )

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "beni"}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_name, **state["engine"].load()})

    async def page(request: Request):
        return HTMLResponse(resources.files("beni_pipeline.serve").joinpath("page.html").read_text())

    async def bad_request(request: Request, e: BadRequest):
        headers = {"Retry-After": str(settings.retry_after_s)} if e.status == 503 else None
        return JSONResponse(_error(e.message, e.param, e.code, e.status), e.status, headers=headers)

    async def failure(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(_error(f"The server failed on this request: {type(e).__name__}.", None, "server_error", 500), 500)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
            Route("/", page),
        ],
        exception_handlers={BadRequest: bad_request, Exception: failure},
        lifespan=lifespan,
    )


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings = ServeSettings(),
    device=None,
    dtype="float32",
) -> None:
    """Load the model and serve it until SIGINT/SIGTERM; in-flight requests get up to 30 s to finish, then are cancelled."""
    model, processor = load_model(model_dir, device, dtype)
    app = create_app(model, processor, Path(model_dir).resolve().name, settings)
    print(f"serving {model_dir} on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30, log_level="info")


class BackgroundServer:
    """An app under uvicorn on a free 127.0.0.1 port, in a thread of this process (checks, tests, benchmarks): `url`
    while it runs, `stop()` to shut it down as SIGTERM would."""

    def __init__(self, app, timeout_graceful_shutdown: float = 5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.app = f"http://127.0.0.1:{port}", app
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=timeout_graceful_shutdown)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="beni-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The server on port {port} did not start: see its log above.")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def answer_once(model_dir: str | Path, device: str | None = None) -> dict:
    """Serve the model on loopback, ask one question about a generated image through the HTTP API, and stop: the
    reply's text, token counts and seconds. Raises RuntimeError with the server's error when it does not answer."""
    start = time.perf_counter()
    model, processor = load_model(model_dir, device)
    server = BackgroundServer(create_app(model, processor, "model"))
    try:
        image = io.BytesIO()
        Image.radial_gradient("L").convert("RGB").save(image, "JPEG")
        url = "data:image/jpeg;base64," + base64.b64encode(image.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is written in the image?"}]
        body = {"model": "model", "messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
        if response.status_code != 200:
            raise RuntimeError(f"The server answered HTTP {response.status_code}: {response.text[:300]}")
        reply = response.json()
    finally:
        server.stop()
    return {"answer": reply["choices"][0]["message"]["content"], **reply["usage"], "seconds": round(time.perf_counter() - start, 2)}


def _error(message: str, param: str | None, code: str, status: int) -> dict:
    kind = {404: "not_found_error", 413: "invalid_request_error", 503: "server_busy", 500: "server_error"}.get(
        status, "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _read_body(request: Request, limit: int) -> bytes:
    if int(request.headers.get("content-length") or 0) > limit:
        raise BadRequest(f"The request body is over {limit} bytes: send smaller or fewer images.", code="body_too_large", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"The request body is over {limit} bytes: send smaller or fewer images.", code="body_too_large", status=413)
    return bytes(body)


async def _collect(request: Request, sequence: Sequence, events: asyncio.Queue) -> tuple[str, dict] | None:
    """The whole answer, or None when the client hung up first, which frees its slot (http.disconnect comes once the
    body is read)."""
    disconnect = asyncio.ensure_future(_disconnected(request))
    pieces = []
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return None
            event = getter.result()
            if "error" in event:
                raise BadRequest(event["error"], code="server_error", status=event.get("status", 500))
            if "finish" in event:
                return "".join(pieces), event
            pieces.append(event["text"])
    finally:
        sequence.cancelled = True  # a no-op once it finished
        disconnect.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(sequence: Sequence, events: asyncio.Queue, reply_id, created, model_name, usage, include_usage):
    """Server-sent events as OpenAI streams them: a role chunk, content deltas, a finish chunk, [DONE]. Starlette cancels
    this generator when the client disconnects; the sequence is then dropped at the engine's next step."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name}
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return f"data: {json.dumps({**body, **extra})}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            # Text that arrived while the last chunk was written goes out as one chunk: under load a client then
            # gets fewer, longer chunks rather than falling behind by one chunk per token.
            while "text" in event and not events.empty():
                following = events.get_nowait()
                if "text" not in following:
                    yield chunk({"content": event["text"]})
                    event = following
                    break
                event = {"text": event["text"] + following["text"]}
            if "error" in event:
                yield f"data: {json.dumps(_error(event['error'], None, 'server_error', event.get('status', 500)))}\n\n"
                break
            if "finish" in event:
                yield chunk({}, event["finish"])
                if include_usage:
                    done = {**usage, "completion_tokens": event["completion_tokens"]}
                    done["total_tokens"] = done["prompt_tokens"] + done["completion_tokens"]
                    body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name, "choices": []}
                    yield f"data: {json.dumps({**body, 'usage': done})}\n\n"
                break
            yield chunk({"content": event["text"]})
        yield "data: [DONE]\n\n"
    finally:
        sequence.cancelled = True
