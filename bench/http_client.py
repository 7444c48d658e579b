"""CPU per request of the download worker's HTTP side: httpx's client on aiohttp's transport against httpx requests
sent straight to that transport (what `prep/fetch.py` does), 3000 GETs of the download bench's JPEGs from nginx on
loopback, 64 in flight, rounds alternated.

    .venv/bin/python bench/http_client.py --rounds 4
"""

import argparse
import asyncio
import resource
import statistics
import tempfile
from pathlib import Path

import httpx
import uvloop
from download import generate_images, start_nginx
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

TIMEOUT = httpx.Timeout(10, connect=5, pool=5)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def through_client(urls: list[str]) -> None:
    async with HttpxAiohttpClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=64), follow_redirects=True) as client:

        async def pull(pending):
            for url in pending:
                async with client.stream("GET", url) as response:
                    async for _ in response.aiter_bytes():
                        pass

        pending = iter(urls)
        await asyncio.gather(*(pull(pending) for _ in range(64)))


async def to_transport(urls: list[str]) -> None:
    transport = AiohttpTransport(limits=httpx.Limits(max_connections=64))

    async def pull(pending):
        for url in pending:
            response = await transport.handle_async_request(httpx.Request("GET", url, extensions={"timeout": TIMEOUT.as_dict()}))
            try:
                async for _ in response.aiter_bytes():
                    pass
            finally:
                await response.aclose()

    pending = iter(urls)
    await asyncio.gather(*(pull(pending) for _ in range(64)))
    await transport.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    root = generate_images(args.images)
    nginx, base = start_nginx(root, Path(tempfile.mkdtemp()))
    urls = [f"{base}/{path.name}" for path in sorted(root.glob("*.jpg"))]
    ms = {"httpx client": [], "straight to the transport": []}
    try:
        for _ in range(args.rounds):
            for name, run in zip(ms, (through_client, to_transport)):
                start = cpu_seconds()
                uvloop.run(run(urls))
                ms[name].append((cpu_seconds() - start) / len(urls) * 1e3)
    finally:
        nginx.terminate()
    for name, values in ms.items():
        print(f"{name}: {statistics.median(values):.3f} ms of CPU per request (rounds: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
