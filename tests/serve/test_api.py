"""The official openai client against the real server on 127.0.0.1: answers equal transformers' greedy generate."""

import asyncio
import base64
import concurrent.futures
import json

from openai import OpenAI

from beni_model.data import decode_image
from beni_model.evaluate import question_prompt
from beni_pipeline.prep.images import process_image
from beni_pipeline.serve.app import _stream
from beni_pipeline.serve.engine import Sampling, Sequence
from tests.conftest import jpeg_bytes
from tests.serve.conftest import SETTINGS, health

QUESTIONS = ["What is written in the image?", "Describe the picture.", "How many cats are there?", "Read the text.", "Is it red?"]


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def ask(question: str, image: bytes | None = None) -> list[dict]:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": content}]


def greedy(loaded, question: str, image: bytes, max_new_tokens: int) -> str:
    """transformers' generate(do_sample=False) on the eval's prompt and the processor's pixels, from the image as the
    downloader stores it (the server checks and re-encodes images the same way)."""
    model, processor = loaded
    s = SETTINGS.images
    stored = process_image(image, resize_mode=s.resize_mode, image_size=s.image_size, image_format=s.image_format, quality=s.quality,
                           min_side=s.min_side, max_pixels=s.max_pixels)  # fmt: skip
    prompt = question_prompt(question, processor)
    inputs = processor(text=[prompt], images=[decode_image(stored.data)], add_special_tokens=False, return_tensors="pt")
    tokenizer = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list()] == ["final"]
    assert health(server.url)["status"] == "ok"


def test_an_answer_about_an_image_equals_greedy_generate(server, loaded):
    image = jpeg_bytes(64, 48, seed=1)
    reply = client(server).chat.completions.create(model="final", messages=ask(QUESTIONS[0], image), max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == greedy(loaded, QUESTIONS[0], image, 12)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0


def test_a_streamed_answer_arrives_in_pieces_and_equals_the_plain_one(server, loaded):
    image = jpeg_bytes(80, 60, seed=2)
    stream = client(server).chat.completions.create(model="final", messages=ask(QUESTIONS[1], image), max_tokens=16, temperature=0,
                                                    stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # Under load the text that arrived while the last chunk was written goes out as one (test_stream_coalesces_...)
    assert pieces and "".join(pieces) == greedy(loaded, QUESTIONS[1], image, 16)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= len(pieces)


def test_concurrent_requests_share_forward_passes_and_each_equals_greedy_generate(server, loaded):
    images = [jpeg_bytes(48 + 8 * i, 48, seed=i) for i in range(len(QUESTIONS))]
    expected = [greedy(loaded, q, image, 20) for q, image in zip(QUESTIONS, images)]
    before = health(server.url)["steps"]
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        replies = list(pool.map(lambda qi: client(server).chat.completions.create(
            model="final", messages=ask(*qi), max_tokens=20, temperature=0).choices[0].message.content, zip(QUESTIONS, images)))  # fmt: skip
    assert replies == expected
    assert all(replies) and len(set(replies)) > 1  # answers that depend on the question and image
    tokens = sum(len(loaded[1].tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    assert health(server.url)["steps"] - before < tokens  # one decode pass served several sequences


def test_an_image_url_is_fetched_with_the_downloaders_checks(server, loaded, fault_server):
    reply = client(server).chat.completions.create(
        model="final", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{fault_server.url}/img/3.jpg"}}, {"type": "text", "text": QUESTIONS[3]}]}],
        max_tokens=10, temperature=0)  # fmt: skip
    assert reply.choices[0].message.content == greedy(loaded, QUESTIONS[3], fault_server.images["/img/3.jpg"], 10)


def test_stop_strings_and_max_tokens_end_the_answer(server):
    messages = ask(QUESTIONS[0], jpeg_bytes(64, 48, seed=1))
    full = client(server).chat.completions.create(model="final", messages=messages, max_tokens=24, temperature=0).choices[0]
    assert len(full.message.content) > 4
    stop = full.message.content[2:4]
    cut = client(server).chat.completions.create(model="final", messages=messages, max_tokens=24, temperature=0, stop=[stop]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (full.message.content[: full.message.content.index(stop)], "stop")
    short = client(server).chat.completions.create(model="final", messages=messages, max_tokens=3, temperature=0)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")


def test_sampling_follows_the_seed_and_top_p(server):
    messages = ask(QUESTIONS[2], jpeg_bytes(64, 48, seed=3))

    def sample(seed, top_p=1.0):
        return client(server).chat.completions.create(model="final", messages=messages, max_tokens=16, temperature=1.5, top_p=top_p,
                                                      seed=seed).choices[0].message.content  # fmt: skip

    assert sample(1) == sample(1)
    assert len({sample(seed) for seed in range(4)}) > 1
    greedy_answer = client(server).chat.completions.create(model="final", messages=messages, max_tokens=16, temperature=0)
    assert sample(5, top_p=1e-6) == greedy_answer.choices[0].message.content  # a nucleus of one token is greedy


def test_stream_sends_each_piece_as_it_comes_and_coalesces_what_waited():
    """The server-sent events themselves: pieces that arrive while the client keeps up go out one chunk each; pieces
    that queued while a chunk was being written go out as one."""

    async def streamed(events: list[dict], queued_first: bool) -> list[str]:
        queue, sequence = asyncio.Queue(), Sequence([], None, Sampling(max_tokens=4), emit=lambda _: None)
        if queued_first:
            for event in events:
                queue.put_nowait(event)
        out = _stream(sequence, queue, "id", 0, "final", {"prompt_tokens": 1}, False)
        texts = [await anext(out)]  # the role chunk
        for event in [] if queued_first else events:
            queue.put_nowait(event)
            texts.append(await anext(out))
        texts += [text async for text in out]
        assert sequence.cancelled  # the engine drops a sequence whose stream ended
        return [json.loads(t[6:])["choices"][0]["delta"].get("content") for t in texts if t.startswith("data: {")]

    events = [{"text": "ab"}, {"text": "c"}, {"text": "d"}, {"finish": "stop", "completion_tokens": 3}]
    assert asyncio.run(streamed(events, queued_first=False)) == ["", "ab", "c", "d", None]
    assert asyncio.run(streamed(events, queued_first=True)) == ["", "abcd", None]
