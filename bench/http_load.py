"""HTTP load generator: streaming chat clients against a real gateway (closed or open loop)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import redis.asyncio as aioredis

from bench.metrics import RequestRecord
from bench.workload import BenchRequest
from shared.keys import Keys


def parse_sse_line(line: str) -> tuple[str, dict | None]:  # type: ignore[type-arg]
    """``("done", None)`` for ``[DONE]``, ``("data", chunk)`` for JSON data, else ``("", None)``."""
    if not line.startswith("data: "):
        return "", None
    payload = line[6:].strip()
    if payload == "[DONE]":
        return "done", None
    return "data", json.loads(payload)


def chunk_text(chunk: dict) -> str:  # type: ignore[type-arg]
    text = ""
    for choice in chunk.get("choices") or []:
        text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text


async def _one(client: httpx.AsyncClient, model: str, request: BenchRequest,
               submitted: float, client_id: int = 0) -> RequestRecord:
    rec = RequestRecord(submitted=submitted, client=client_id)
    body = {"model": model, "messages": request.messages, "max_tokens": request.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                kind, chunk = parse_sse_line(line)
                if kind == "done":
                    break
                if chunk is None:
                    continue
                if "error" in chunk:
                    rec.error = str(chunk["error"])
                if chunk_text(chunk):
                    now = time.perf_counter()
                    rec.token_times.append(now)
                    rec.first_token = rec.first_token or now
                usage = chunk.get("usage")
                if usage:
                    rec.output_tokens = int(usage.get("completion_tokens", 0))
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.finished = time.perf_counter()
    return rec


async def _sample_batch(redis_url: str, prefix: str, stop: asyncio.Event,
                        samples: list[int]) -> None:
    """Mean running batch: the workers' heartbeat ``batch_size``, sampled every 100 ms."""
    keys = Keys(prefix)
    client = aioredis.Redis.from_url(redis_url)
    try:
        while not stop.is_set():
            workers = await client.zrange(keys.workers, 0, -1)
            sizes = [await client.hget(keys.worker(w.decode()), "batch_size") for w in workers]
            busy = sum(int(s) for s in sizes if s)
            if busy:
                samples.append(busy)
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


async def run_http(base_url: str, model: str, per_client: list[list[BenchRequest]],
                   *, redis_url: str | None = None, prefix: str = "tf",
                   rate: float | None = None, seed: int = 0,
                   ) -> tuple[list[RequestRecord], float, float | None]:
    """Closed loop (``rate`` None) or Poisson open loop at ``rate`` requests/s."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    timeout = httpx.Timeout(600, connect=10)
    samples: list[int] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        sampler = asyncio.create_task(_sample_batch(redis_url, prefix, stop, samples)) \
            if redis_url else None
        start = time.perf_counter()
        if rate is None:
            async def loop(queue: list[BenchRequest], cid: int) -> list[RequestRecord]:
                return [await _one(client, model, r, time.perf_counter(), cid) for r in queue]
            per = await asyncio.gather(*(loop(q, i) for i, q in enumerate(per_client)))
            records = [r for recs in per for r in recs]
        else:
            rng = random.Random(seed)
            flat = [r for q in per_client for r in q]
            offsets, t = [], 0.0
            for _ in flat:
                t += rng.expovariate(rate)
                offsets.append(t)

            async def arrive(request: BenchRequest, offset: float) -> RequestRecord:
                await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
                return await _one(client, model, request, start + offset)
            records = list(await asyncio.gather(*(arrive(r, o) for r, o in
                                                  zip(flat, offsets, strict=True))))
        wall = time.perf_counter() - start
        stop.set()
        if sampler:
            await sampler
    mean_batch = sum(samples) / len(samples) if samples else None
    return records, wall, mean_batch
