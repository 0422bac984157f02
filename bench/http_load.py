"""HTTP load generator: streaming chat clients against a real gateway (closed or open loop)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis

from bench.loadgen import Load, Submission
from bench.metrics import RequestRecord, RunResult
from bench.rawhttp import RawClient, StatusError
from bench.workload import BenchRequest
from shared.keys import Keys

T = TypeVar("T")


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


CHAT_PATH = "/v1/chat/completions"
HTTP_CLIENTS = ("httpx", "raw")

Lines = Callable[[dict[str, Any]], AsyncIterator[str]]


def chat_body(model: str, request: BenchRequest,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A streamed, greedy chat completion of exactly ``max_tokens`` tokens (``extra``:
    more request fields, e.g. ``bench.features``)."""
    return {"model": model, "messages": request.messages, "max_tokens": request.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}


def httpx_lines(client: httpx.AsyncClient) -> Lines:
    async def lines(body: dict[str, Any]) -> AsyncIterator[str]:
        async with client.stream("POST", CHAT_PATH, json=body) as resp:
            if resp.status_code != 200:
                raise StatusError(resp.status_code, await resp.aread())
            async for line in resp.aiter_lines():
                yield line
    return lines


def raw_lines(client: RawClient) -> Lines:
    def lines(body: dict[str, Any]) -> AsyncIterator[str]:
        return client.post_lines(CHAT_PATH, json.dumps(body).encode())
    return lines


async def _one(lines: Lines, model: str, sub: Submission,
               extra: Mapping[str, Any] | None = None) -> RequestRecord:
    """Send one request, read its whole stream; TTFT = first content chunk, one
    ``token_times`` entry per content chunk."""
    rec = RequestRecord(submitted=sub.submitted, client=sub.client)
    try:
        async with contextlib.aclosing(lines(chat_body(model, sub.request, extra))) as stream:
            async for line in stream:  # read to the end: the connection can be reused
                _, chunk = parse_sse_line(line)
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
    except (StatusError, httpx.HTTPError, OSError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError, ValueError) as exc:
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


async def run_http(base_url: str, model: str, load: Load, *, redis_url: str | None = None,
                   prefix: str = "tf", http_client: str = "httpx",
                   extra_body: Mapping[str, Any] | None = None,
                   keepalive: bool = True) -> RunResult:
    """Streaming chat clients driven by ``load`` (closed or open loop), all on one client
    with a large connection pool: ``httpx.AsyncClient``, or the leaner ``RawClient``. With
    ``redis_url``, the mean running batch is sampled from the workers' heartbeats.
    ``keepalive=False`` opens a connection per request: for servers that close
    a connection after a streamed answer (llama-server), where reusing it would fail."""
    if http_client not in HTTP_CLIENTS:
        raise ValueError(f"unknown HTTP client {http_client!r}")
    async with contextlib.AsyncExitStack() as stack:
        if http_client == "raw":
            raw = RawClient(base_url, keepalive=keepalive)
            stack.push_async_callback(raw.aclose)
            lines = raw_lines(raw)
        else:
            client = await stack.enter_async_context(httpx.AsyncClient(
                base_url=base_url, timeout=httpx.Timeout(600, connect=10),
                limits=httpx.Limits(max_connections=1024,
                                    max_keepalive_connections=1024 if keepalive else 0)))
            lines = httpx_lines(client)
        return await _drive(lines, model, load, redis_url, prefix, extra_body)


async def _drive(lines: Lines, model: str, load: Load, redis_url: str | None,
                 prefix: str, extra: Mapping[str, Any] | None = None) -> RunResult:
    samples: list[int] = []
    stop = asyncio.Event()
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(sub: Submission) -> None:
        try:
            rec = await _one(lines, model, sub, extra)
        except Exception as exc:  # anything unforeseen: count it, keep the client going
            rec = RequestRecord(sub.submitted, client=sub.client, finished=time.perf_counter(),
                                error=f"{type(exc).__name__}: {exc}")
        records.append(rec)
        spawn(load.finished(sub.client, rec.finished or time.perf_counter()))

    def spawn(subs: list[Submission]) -> None:
        for sub in subs:
            task = asyncio.create_task(serve(sub))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    sampler = asyncio.create_task(_sample_batch(redis_url, prefix, stop, samples)) \
        if redis_url else None
    start = time.perf_counter()
    spawn(load.start(start))
    while True:  # open loop: send on schedule; then (and in a closed loop) wait for all
        nxt = load.next_arrival()
        if nxt is not None:
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            spawn(load.due(time.perf_counter()))
        elif tasks:
            await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
        else:
            break
    wall = time.perf_counter() - start
    stop.set()
    if sampler:
        await sampler
    mean_batch = sum(samples) / len(samples) if samples else None
    return RunResult(records, wall, mean_batch)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (it comes with ``uvicorn[standard]``):
    a cheaper event loop leaves more CPU to the processes being measured."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if not hasattr(asyncio, "Runner"):  # Python 3.10
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
