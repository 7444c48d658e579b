"""`beni serve` under load: requests/s, output tokens/s, p50/p95 time to first token and latency at several
concurrencies, in the same run, against two peers on the same weights:
- `generate per request`: transformers' generate run per request, one at a time (what a transformers pipeline does
  per call), behind beni's own HTTP API and input code;
- `transformers serve`: transformers' own server (a subprocess) on the model's LLaVA export, since it loads a model
  by its architecture's name in `transformers` and so cannot host the beni class; for a VLM it generates one request
  at a time (its continuous batching is for text-only LLMs). Needs `pip install fastapi`; --no-transformers-serve
  leaves it out.
Every request streams (SSE) an answer about its own image, greedy, `--max-tokens` long at most; every side must give
beni serve's answers. transformers serve gets each image as beni serve stores it (re-encoded as the downloader does),
so both preprocess the same pixels.

beni serve and its per-request peer run in this process under uvicorn, each in its own thread, and the load comes
from an asyncio httpx client here: GIL contention touches both alike.

    PYTHONUNBUFFERED=1 python bench/serve.py [--model DIR] [--device cuda] [--concurrency 1 8 32] [--max-tokens 32]

Without --model it serves a tiny random model built here (beni_model.tiny's LLM + a tiny SigLIP), weights scaled
so that answers differ from prompt to prompt.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image, ImageDraw
from transformers import SiglipVisionConfig
from transformers.generation.streamers import BaseStreamer

from beni_model.chat import load_tokenizer
from beni_model.config import BeniConfig
from beni_model.evaluate import placement
from beni_model.export import export_llava
from beni_model.modeling import BeniForConditionalGeneration
from beni_model.tiny import tiny_llm
from beni_pipeline.prep.download import DownloadSettings
from beni_pipeline.prep.images import process_image
from beni_pipeline.serve.app import DTYPES, BackgroundServer, ServeSettings, create_app, load_model
from beni_pipeline.serve.engine import Busy

QUESTIONS = ["What is written in the image?", "Read the text.", "Describe the picture.", "What number is shown?"]


class PerRequest:
    """The peer engine: transformers' generate for one request at a time, streaming its tokens as they come."""

    def __init__(self, model, tokenizer, max_batch: int, max_waiting: int):
        self.model, self.tokenizer, self.max_waiting = model, tokenizer, max_waiting
        self.device, self.dtype = placement(model)
        self.queue, self.steps = queue.Queue(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, sequence) -> None:
        if self.queue.qsize() >= self.max_waiting:
            raise Busy(f"{self.queue.qsize()} requests are waiting")
        self.queue.put(sequence)

    def load(self) -> dict:
        return {"active": 0, "waiting": self.queue.qsize(), "steps": self.steps}

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(60)

    def _run(self) -> None:
        while (sequence := self.queue.get()) is not None:
            ids = torch.tensor([sequence.input_ids], device=self.device)
            pixels = None if sequence.pixel_values is None else sequence.pixel_values.to(self.device, self.dtype)
            streamer = _Streamer(sequence, self.tokenizer)
            self.model.generate(
                input_ids=ids,
                pixel_values=pixels,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=sequence.sampling.max_tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            ended = bool(streamer.tokens) and streamer.tokens[-1] == self.tokenizer.eos_token_id
            sequence.emit({"finish": "stop" if ended else "length", "completion_tokens": len(streamer.tokens)})


class _Streamer(BaseStreamer):
    def __init__(self, sequence, tokenizer):
        self.sequence, self.tokenizer, self.tokens, self.sent, self.prompt_seen = sequence, tokenizer, [], 0, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands the streamer the prompt first
            self.prompt_seen = True
            return
        self.tokens += value.flatten().tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.sent and not text.endswith("\ufffd"):
            self.sequence.emit({"text": text[self.sent :]})
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.sent:
            self.sequence.emit({"text": text[self.sent :]})


def tiny_model(folder: Path) -> Path:
    torch.manual_seed(0)
    llm = tiny_llm(folder / "llm")
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = BeniConfig(vision_config=vision.to_dict(), text_model=str(llm))
    tokenizer = load_tokenizer(str(llm), config.image_token)
    model = BeniForConditionalGeneration.from_parts(config, tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # at the usual init scale a random model answers every prompt with the same tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=generator)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model"


def image_bytes(i: int) -> bytes:
    image = Image.radial_gradient("L").convert("RGB").resize((96 + 8 * (i % 7), 64))
    ImageDraw.Draw(image).text((8, 24), f"{i * 7919 % 100000}", fill=(255, 40, 40))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def request(i: int, max_tokens: int, model: str = "model", stored: bool = False) -> dict:
    """Request i; `stored`: its image as beni serve stores it (for a server that does not re-encode images)."""
    data = image_bytes(i)
    if stored:
        s = DownloadSettings()
        data = process_image(data, resize_mode=s.resize_mode, image_size=s.image_size, image_format=s.image_format, quality=s.quality,
                             min_side=s.min_side, max_pixels=s.max_pixels).data  # fmt: skip
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class TransformersServe:
    """`transformers serve FOLDER` in a subprocess on a free port, until `stop`."""

    def __init__(self, folder: Path, device: str, threads: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{port}", tempfile.TemporaryFile()
        command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--port", str(port), "--device", device]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"transformers serve did not start: {self.log.read().decode()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def same_answer(a: str | None, b: str | None) -> bool:
    """Equal up to a trailing incomplete UTF-8 character, which transformers serve's detokenizer drops and beni serve
    sends as U+FFFD (a random model emits byte tokens that end mid-character)."""
    return a is not None and b is not None and a.rstrip("\ufffd") == b.rstrip("\ufffd")


async def drive(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[dict]]:
    """Send `bodies` with `concurrency` in flight; each request's TTFT, latency, tokens and text."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(body: dict) -> dict:
            async with gate:
                start, first, pieces, tokens = time.perf_counter(), None, [], 0
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        return {"status": response.status_code}
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        for choice in chunk.get("choices", []):
                            if choice["delta"].get("content"):
                                first = first or time.perf_counter()
                                pieces.append(choice["delta"]["content"])
                end = time.perf_counter()
                return {"status": 200, "ttft": (first or end) - start, "latency": end - start, "tokens": tokens, "text": "".join(pieces)}

        start = time.perf_counter()
        results = await asyncio.gather(*(one(body) for body in bodies))
        return time.perf_counter() - start, results


def summary(wall: float, results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == 200]

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in ok)
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "requests_per_s": round(len(ok) / wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": pct("ttft", 0.5),
        "ttft_p95_ms": pct("ttft", 0.95),
        "latency_p50_ms": pct("latency", 0.5),
        "latency_p95_ms": pct("latency", 0.95),
        "mean_tokens": round(statistics.mean(r["tokens"] for r in ok), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved beni model, quantized export or LLaVA export (default: a tiny random one)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the served weights' dtype (both sides)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, at least 16)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-transformers-serve", dest="transformers_serve", action="store_false", help="leave transformers serve out")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a tiny model on a shared CPU: 1)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    # On this shared 2-core machine two intra-op threads in the engine's thread cost a tiny model's forward 30x
    # (idle-spinning OpenMP workers); both sides get the same setting.
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or tiny_model(Path(tmp))
        model, processor = load_model(model_dir, args.device, args.dtype)
        settings = ServeSettings(max_batch=max(args.concurrency), max_waiting=max(args.requests, 2 * max(args.concurrency), 16))
        servers = {
            "beni serve": BackgroundServer(create_app(model, processor, "model", settings)),
            "generate per request": BackgroundServer(create_app(model, processor, "model", settings, engine=PerRequest)),
        }
        names = {}  # servers that answer to another model name, and get images as beni serve stores them
        if args.transformers_serve:
            llava = export_llava(model, Path(tmp) / "llava", processor)
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            servers["transformers serve (LLaVA export)"] = TransformersServe(llava, device, args.threads)
            names["transformers serve (LLaVA export)"] = str(llava)
        rows = []
        try:
            for name, server in servers.items():  # warm-up: first-call costs (allocations, lazy imports) count nowhere
                asyncio.run(drive(server.url, [request(0, 4, names.get(name, "model"), name in names)], 1))
            for concurrency in args.concurrency:
                count = args.requests or max(16, 2 * concurrency)
                texts = {}
                for name, server in servers.items():
                    bodies = [request(i, args.max_tokens, names.get(name, "model"), name in names) for i in range(count)]
                    load = os.getloadavg()[0]
                    wall, results = asyncio.run(drive(server.url, bodies, concurrency))
                    texts[name] = [r.get("text") for r in results]
                    rows.append({"server": name, "concurrency": concurrency, **summary(wall, results), "load_avg": round(load, 2)})
                for row in rows[-len(servers) :]:
                    same = sum(same_answer(a, b) for a, b in zip(texts["beni serve"], texts[row["server"]]))
                    row["identical_answers"] = f"{same}/{count}"
                    print(json.dumps(row), flush=True)
        finally:
            for server in servers.values():
                server.stop()
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() and (args.device or "cuda") == "cuda" else platform.processor() or "cpu"
    )
    print(
        f"\nmodel {args.model or 'tiny random'} in {args.dtype}, {device}, torch {torch.__version__}, {os.cpu_count()} CPUs, max_tokens {args.max_tokens}\n"
    )
    print(
        "| server | concurrency | requests/s | output tokens/s | TTFT p50 / p95 ms | latency p50 / p95 ms | answers identical to beni serve's |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['server']} | {r['concurrency']} | {r['requests_per_s']} | {r['output_tokens_per_s']} | {r['ttft_p50_ms']} / "
            f"{r['ttft_p95_ms']} | {r['latency_p50_ms']} / {r['latency_p95_ms']} | {r['identical_answers']} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
