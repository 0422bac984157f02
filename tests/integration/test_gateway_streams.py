"""Streams and waits against the real worker loop (null engine, in a thread): queue
timeouts, gaps in live streams, compacted jobs, keep-alives, disconnects, and resuming a job
stream with ``Last-Event-ID``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from gateway import reader
from gateway.app import create_app
from gateway.events import Dispatcher
from shared.keys import Keys
from shared.protocol import unpack_events
from shared.settings import Settings
from tests.conftest import free_port
from tests.integration import waiting
from worker.engine.types import RequestOutput
from worker.heartbeat import STATE_READY, Heartbeat, WorkerStatus
from worker.main import make_worker_id, start_heartbeat
from worker.null_engine import NullEngine, null_model_info, word_token
from worker.service import WorkerService

pytestmark = pytest.mark.integration

MODEL = "null-model"
PREFIX = "tftest"
KEYS = Keys(PREFIX)
TIMEOUT_S = 20.0
NUM_TOKENS = 16
TEXT = "".join(word_token(i)[1] for i in range(NUM_TOKENS))


class GatedEngine(NullEngine):
    """A null engine whose steps wait for the test: ``allow(n)`` lets n steps run."""

    def __init__(self, max_batch_size: int, num_tokens: int) -> None:
        super().__init__(max_batch_size, num_tokens)
        self._steps = threading.Semaphore(0)
        self._is_open = threading.Event()

    def allow(self, num_steps: int = 1) -> None:
        for _ in range(num_steps):
            self._steps.release()

    def open(self) -> None:
        self._is_open.set()
        self._steps.release()

    def step(self) -> list[RequestOutput]:
        if self.has_unfinished():
            deadline = time.monotonic() + TIMEOUT_S
            while not self._is_open.is_set() and not self._steps.acquire(timeout=0.05):
                if time.monotonic() > deadline:
                    raise RuntimeError("the test never let the engine step")
        return super().step()


@dataclass
class Worker:
    service: WorkerService
    engine: NullEngine
    heartbeat: Heartbeat
    thread: threading.Thread

    def stop(self) -> None:
        if isinstance(self.engine, GatedEngine):
            self.engine.open()
        self.service.request_stop()
        self.thread.join(TIMEOUT_S)
        self.heartbeat.stop()
        assert not self.thread.is_alive()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, served_model_name=MODEL,
                    engine="null", null_engine_tokens=NUM_TOKENS, heartbeat_interval_s=0.1,
                    coalesce_ms=5.0, max_tokens_cap=4096)


@pytest.fixture
def start_worker(settings: Settings) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(gated: bool = False, **overrides: Any) -> Worker:
        worker_settings = settings.model_copy(update=overrides)
        size, tokens = worker_settings.max_batch_size, worker_settings.null_engine_tokens
        engine = GatedEngine(size, tokens) if gated else NullEngine(size, tokens)
        status = WorkerStatus(worker_id=make_worker_id(), model=MODEL)
        heartbeat = start_heartbeat(worker_settings, status)
        service = WorkerService(worker_settings, engine, null_model_info(MODEL), status=status)
        thread = threading.Thread(target=service.run, daemon=True)
        worker = Worker(service, engine, heartbeat, thread)
        thread.start()
        started.append(worker)
        waiting.wait_for(lambda: status.state == STATE_READY, TIMEOUT_S)
        heartbeat.beat()  # warm now, not at the next tick
        return worker

    yield start
    for worker in started:
        worker.stop()


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The gateway on a real port (uvicorn), ready (a warm worker seen), and a client."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or serving.done())
        port = server.config.port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     timeout=TIMEOUT_S) as http:
            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200
            await until_async(ready)
            yield http, app
    finally:
        server.should_exit = True
        await serving


async def until(predicate: Callable[[], object], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def until_async(predicate: Callable[[], Any], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def job_ids(redis: aioredis.Redis) -> list[str]:
    prefix = KEYS.job("")
    names = [k.decode() for k in await redis.keys(prefix + "*")]
    return [n[len(prefix):] for n in names if ":" not in n[len(prefix):]]


async def status_of(redis: aioredis.Redis, job_id: str) -> str | None:
    raw = await redis.hget(KEYS.job(job_id), "status")
    return None if raw is None else raw.decode()


def sse_blocks(body: str) -> list[dict[str, str]]:
    """Each SSE block as ``{field: value}`` (comments under ``":"``)."""
    blocks = []
    for block in body.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                fields[":"] = line[1:].strip()
            elif ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def text_of(blocks: list[dict[str, str]]) -> str:
    parts = []
    for block in blocks:
        if "data" not in block or block["data"] == "[DONE]" or block.get("event"):
            continue
        for choice in json.loads(block["data"]).get("choices", []):
            parts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


async def _any_running(redis: aioredis.Redis) -> bool:
    return any([await status_of(redis, j) == "running" for j in await job_ids(redis)])


# --- queue timeouts ---------------------------------------------------------------------


async def test_queue_timeout_is_504_queue_timeout_not_500(
        settings: Settings, start_worker: Callable[..., Worker]) -> None:
    start_worker()
    async with served(settings) as (http, _):
        # a deadline a microsecond away has always passed when the worker reads the entry
        response = await http.post("/v1/chat/completions", json=chat(timeout=1e-6))
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("queue_timeout", "timeout_error")
        assert "timed out in queue" in error["message"]

        response = await http.post("/v1/chat/completions", json=chat(timeout=1e-6, stream=True))
        assert response.status_code == 200
        blocks = sse_blocks(response.text)
        assert blocks[-1]["data"] == "[DONE]"
        error = json.loads(blocks[-2]["data"])["error"]
        assert error["code"] == "queue_timeout"

        ok = await http.post("/v1/chat/completions", json=chat(timeout=60))
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == TEXT


async def test_queue_timeout_of_a_job_has_an_error_code(
        settings: Settings, start_worker: Callable[..., Worker]) -> None:
    start_worker()
    async with served(settings) as (http, _):
        job = (await http.post("/v1/jobs", json=chat(timeout=1e-6))).json()
        assert job["error_code"] is None

        async def failed() -> bool:
            return (await http.get(f"/v1/jobs/{job['id']}")).json()["status"] == "failed"
        await until_async(failed)
        view = (await http.get(f"/v1/jobs/{job['id']}")).json()
        assert (view["error_code"], view["finish_reason"]) == ("queue_timeout", "timeout")
        blocks = sse_blocks((await http.get(f"/v1/jobs/{job['id']}/stream")).text)
        assert json.loads(blocks[-2]["data"])["error"]["code"] == "queue_timeout"


async def test_a_request_left_in_the_queue_times_out_at_its_deadline(
        settings: Settings, start_worker: Callable[..., Worker], redis: aioredis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No worker reads it (the only one is busy): the gateway itself ends the wait, and
    cancels the request so that it never runs after its client was told it timed out."""
    monkeypatch.setattr(reader, "IDLE_CHECK_S", 0.05)
    monkeypatch.setattr(reader, "QUEUE_TIMEOUT_GRACE_S", 0.0)
    worker = start_worker(gated=True, max_batch_size=1)
    engine: GatedEngine = worker.engine  # type: ignore[assignment]
    async with served(settings) as (http, _):
        busy = asyncio.create_task(http.post("/v1/chat/completions", json=chat()))
        engine.allow(1)
        await until_async(lambda: _any_running(redis))
        for body in (chat(timeout=0.2), chat(timeout=0.2, stream=True)):
            response = await http.post("/v1/chat/completions", json=body)
            if body.get("stream"):
                error = json.loads(sse_blocks(response.text)[-2]["data"])["error"]
            else:
                assert response.status_code == 504, response.text
                error = response.json()["error"]
            assert error["code"] == "queue_timeout"
        expired = [j for j in await job_ids(redis) if await status_of(redis, j) == "cancelled"]
        assert len(expired) == 2
        engine.open()
        assert (await busy).status_code == 200

        async def all_read() -> bool:  # the worker reads the two entries and drops them
            stream = KEYS.requests_stream(MODEL, "interactive")
            return int((await redis.xpending(stream, "workers"))["pending"]) == 0 \
                and await redis.xlen(stream) == 3
        await until_async(all_read)
        admitted = {job_id for batch in engine.admissions for job_id in batch}
        assert not admitted & set(expired)  # never generated


# --- waits and disconnects --------------------------------------------------------------


async def test_a_running_request_outlives_its_timeout(
        settings: Settings, start_worker: Callable[..., Worker], redis: aioredis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``timeout`` bounds the queue wait only: no gateway timer cancels a running request."""
    monkeypatch.setattr(reader, "IDLE_CHECK_S", 0.05)
    monkeypatch.setattr(reader, "QUEUE_TIMEOUT_GRACE_S", 0.0)
    timed = settings.model_copy(update={"request_timeout_s": 1.0})
    worker = start_worker(gated=True)
    async with served(timed) as (http, _):
        answer = asyncio.create_task(http.post("/v1/completions",
                                               json={"model": MODEL, "prompt": "hi"}))
        worker.engine.allow(1)  # type: ignore[attr-defined]
        await until_async(lambda: _any_running(redis))
        started = time.time()
        await until(lambda: time.time() > started + 1.5)  # past deadline + grace + checks
        assert not answer.done()
        worker.engine.open()  # type: ignore[attr-defined]
        response = await answer
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == TEXT


async def test_a_non_streaming_client_that_leaves_cancels_its_request(
        settings: Settings, start_worker: Callable[..., Worker], redis: aioredis.Redis) -> None:
    worker = start_worker(gated=True, null_engine_tokens=2000)
    async with served(settings) as (http, _):
        answer = asyncio.create_task(http.post("/v1/completions", json={
            "model": MODEL, "prompt": "hi", "max_tokens": 2000}))
        worker.engine.allow(1)  # type: ignore[attr-defined]
        await until_async(lambda: _any_running(redis))
        [job_id] = await job_ids(redis)
        answer.cancel()  # the client closes its connection
        with contextlib.suppress(asyncio.CancelledError):
            await answer

        async def cancel_flag() -> bool:
            return await redis.get(KEYS.cancel(job_id)) == b"1"
        await until_async(cancel_flag)
        worker.engine.open()  # type: ignore[attr-defined]

        async def cancelled() -> bool:
            return await status_of(redis, job_id) == "cancelled"
        await until_async(cancelled)


async def test_an_idle_stream_sends_keep_alive_comments(
        settings: Settings, start_worker: Callable[..., Worker]) -> None:
    worker = start_worker(gated=True)
    quick = settings.model_copy(update={"sse_keepalive_s": 0.05})
    async with served(quick) as (http, _):
        body = {"model": MODEL, "prompt": "hi", "stream": True}
        lines: list[str] = []
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if line == ": keep-alive":
                    worker.engine.open()  # type: ignore[attr-defined]
                if line == "data: [DONE]":
                    break
        assert ": keep-alive" in lines
        assert text_of(sse_blocks("\n".join(lines))) == TEXT


# --- gaps, compaction, resuming ---------------------------------------------------------


def drop_batches(dispatcher: Dispatcher, seqs: set[int]) -> list[int]:
    """Make ``dispatcher`` lose every batch holding one of ``seqs`` (as pub/sub can)."""
    dropped: list[int] = []
    deliver = dispatcher.deliver

    def lossy(data: bytes) -> None:
        events = unpack_events(data)
        lost = [e.seq for e in events if e.seq in seqs and not e.is_terminal]
        if lost:
            dropped.extend(lost)
            return
        deliver(data)

    dispatcher.deliver = lossy  # type: ignore[method-assign]
    return dropped


async def test_gaps_in_a_live_stream_are_filled_from_the_event_list(
        settings: Settings, start_worker: Callable[..., Worker]) -> None:
    start_worker()
    async with served(settings) as (http, app):
        dropped = drop_batches(app.state.gateway.dispatcher, {2, 3, 7, 12})
        response = await http.post("/v1/chat/completions", json=chat(stream=True))
        blocks = sse_blocks(response.text)
        assert blocks[-1]["data"] == "[DONE]"
        assert text_of(blocks) == TEXT
        response = await http.post("/v1/chat/completions", json=chat())
        assert response.json()["choices"][0]["message"]["content"] == TEXT
        assert len(dropped) >= 8  # both requests lost batches: the test tested something


async def test_a_compacted_job_streams_its_whole_text_and_ending(
        settings: Settings, start_worker: Callable[..., Worker], redis: aioredis.Redis) -> None:
    start_worker()
    async with served(settings) as (http, _):
        job = (await http.post("/v1/jobs", json=chat(max_tokens=10))).json()

        async def succeeded() -> bool:
            return await status_of(redis, job["id"]) == "succeeded"
        await until_async(succeeded)
        text = "".join(word_token(i)[1] for i in range(10))
        assert await redis.delete(KEYS.job_events(job["id"])) == 1  # compacted

        blocks = sse_blocks((await http.get(f"/v1/jobs/{job['id']}/stream")).text)
        chunks = [json.loads(b["data"]) for b in blocks if b.get("data", "[DONE]") != "[DONE]"]
        contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
        assert contents == ["", text, None]  # role chunk, the whole text, the final chunk
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 10
        assert blocks[-1]["data"] == "[DONE]"

        resumed = sse_blocks((await http.get(f"/v1/jobs/{job['id']}/stream",
                                             headers={"Last-Event-ID": "4"})).text)
        assert resumed[0]["event"] == "restart"  # it cannot know what the client has
        assert text_of(resumed) == text


async def read_until(response: httpx.Response, num_contents: int) -> list[dict[str, str]]:
    """SSE blocks until ``num_contents`` content chunks arrived."""
    blocks: list[dict[str, str]] = []
    buffer = ""
    async for chunk in response.aiter_text():
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            blocks.extend(sse_blocks(block + "\n\n"))
            if sum(1 for b in blocks if "id" in b and "event" not in b) >= num_contents:
                return blocks
    raise AssertionError("the stream ended early")


async def test_a_job_stream_resumes_after_last_event_id(
        settings: Settings, start_worker: Callable[..., Worker], redis: aioredis.Redis) -> None:
    worker = start_worker(gated=True)
    engine: GatedEngine = worker.engine  # type: ignore[assignment]
    async with served(settings) as (http, _):
        job = (await http.post("/v1/jobs", json=chat())).json()
        engine.allow(5)
        async with http.stream("GET", f"/v1/jobs/{job['id']}/stream") as response:
            first = await read_until(response, 3)  # then the client drops the connection
        last_id = [b["id"] for b in first if "id" in b][-1]
        # the role chunk leads the data (an ``event: queued`` block may come before it when
        # the stream opens while the job still waits for a worker)
        chunks = [b for b in first if "event" not in b]
        assert chunks[0]["data"].find('"role"') > 0 and "id" not in chunks[0]
        engine.open()

        response = await http.get(f"/v1/jobs/{job['id']}/stream",
                                  headers={"Last-Event-ID": last_id})
        rest = sse_blocks(response.text)
        assert '"role"' not in rest[0]["data"]  # no second role chunk
        assert text_of(first) + text_of(rest) == TEXT  # no duplicate, no gap
        ids = [int(b["id"]) for b in first + rest if "id" in b]
        *content_ids, final_id, usage_id, done_id = ids
        assert content_ids == sorted(set(content_ids))  # increasing, each once
        assert final_id == usage_id == done_id > content_ids[-1]  # one id for the ending

        again = await http.get(f"/v1/jobs/{job['id']}/stream",
                               headers={"Last-Event-ID": str(ids[-1])})
        assert sse_blocks(again.text) == [{"id": str(ids[-1]), "data": "[DONE]"}]
        bad = await http.get(f"/v1/jobs/{job['id']}/stream", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
