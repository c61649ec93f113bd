"""Load test (loopback only, bounded): 16 concurrent clients send 208 mixed requests to a live server running
the default model (the bundled shapes-blip2 when installed, else the tiny test BLIP-2). Nothing may be lost
or fail; p50/p95 latency and throughput are printed."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest
from surfaces_fixtures import one_intraop_thread

import vlkit
from vlkit import api
from vlkit.serving.app import BackgroundServer
from vlkit.serving.schemas import ServerSettings

CLIENTS = 16
PER_CLIENT = 13  # 208 requests


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_intraop_thread():
        yield


def _requests(images: list[bytes], n: int) -> list[tuple[str, dict]]:
    """A deterministic mix: captions, questions and classifications of the test images."""
    out = []
    for i in range(n):
        image = images[i % len(images)]
        kind = i % 3
        if kind == 0:
            # Captions at most 10 tokens long keep the test short on a larger (bundled) model.
            out.append(("/v1/caption", {"files": {"image": image}, "data": {"max_new_tokens": "10"}}))
        elif kind == 1:
            out.append(("/v1/vqa", {"files": {"image": image}, "data": {"question": "what color is the shape?"}}))
        else:
            out.append(("/v1/classify", {"files": {"image": image}, "data": {"labels": "circle,square,triangle"}}))
    return out


async def _client(url: str, work: list[tuple[str, dict]], latencies: list[float], failures: list[str]) -> int:
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for path, kwargs in work:
            start = time.perf_counter()
            try:
                response = await client.post(path, **kwargs)
            except httpx.HTTPError as err:
                failures.append(f"{path}: {type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                failures.append(f"{path}: HTTP {response.status_code} {response.text[:200]}")
            elif not any(key in response.json() for key in ("caption", "answer", "labels")):
                failures.append(f"{path}: no result in {response.text[:200]}")
            else:
                done += 1
    return done


def test_load_16_clients_208_requests_nothing_lost(tiny_model_dirs, shape_images, capsys):
    bundled = api._bundled_folder(api.DEFAULT_MODEL)
    pipe = vlkit.load(api.DEFAULT_MODEL if bundled else tiny_model_dirs["blip2"])
    images = [p.read_bytes() for p in shape_images]
    work = _requests(images, CLIENTS * PER_CLIENT)
    latencies: list[float] = []
    failures: list[str] = []
    with BackgroundServer(pipe, ServerSettings(max_batch=16, max_wait_ms=5)) as server:

        async def main() -> list[int]:
            chunks = [work[c::CLIENTS] for c in range(CLIENTS)]
            return await asyncio.gather(*(_client(server.url, chunk, latencies, failures) for chunk in chunks))

        start = time.perf_counter()
        done = asyncio.run(main())
        wall = time.perf_counter() - start
        stats = server.app.state.batcher.stats.as_dict()
    assert not failures, failures[:5]
    assert sum(done) == len(work) == len(latencies) == CLIENTS * PER_CLIENT >= 200
    assert stats["items"] == len(work) and stats["largest_batch"] > 1
    cuts = statistics.quantiles(latencies, n=20)
    p50, p95 = statistics.median(latencies), cuts[18]
    with capsys.disabled():  # shown in the CI log even when the test passes
        print(
            f"\nload test ({'bundled ' + api.DEFAULT_MODEL if bundled else 'tiny test BLIP-2'}): {len(work)} requests "
            f"from {CLIENTS} clients in {wall:.2f} s = {len(work) / wall:.1f} req/s; latency p50 {p50 * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms; {stats['batches']} batches, largest {stats['largest_batch']}"
        )
