"""The gateway when things go wrong: Redis down or restarted, lost events, slow workers,
clients that leave. Also: the gateway never imports torch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from gateway import reader
from gateway.app import create_app
from shared.keys import Keys
from shared.protocol import unpack_request
from shared.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.support.gateway import gateway_client, parse_sse
from tests.support.model import tiny_model_info
from tests.support.worker import register_worker, running_worker

PREFIX = "tftest"
KEYS = Keys(PREFIX)
COMPLETION = {"model": "tiny", "prompt": "hi"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, default_max_tokens=16)


async def test_redis_down_answers_503_quickly(settings: Settings, redis: aioredis.Redis,
                                              redis_server: RedisServer) -> None:
    async with gateway_client(settings) as (http, _), \
            running_worker(settings, tiny_model_info()):
        assert (await http.post("/v1/completions", json=COMPLETION)).status_code == 200
        redis_server.stop()
        started = time.monotonic()
        response = await http.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 503
        assert response.json()["error"]["message"].startswith("Redis unavailable")
        assert time.monotonic() - started < 3.0
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert "Redis unavailable" in ready.json()["reason"]
        assert (await http.get("/healthz")).status_code == 200


async def test_events_flow_again_after_redis_restarts(settings: Settings,
                                                      redis_server: RedisServer) -> None:
    async with gateway_client(settings) as (http, app):
        redis_server.restart()
        async with running_worker(settings, tiny_model_info()):
            for _ in range(100):  # the dispatcher resubscribes within about a second
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert app.state.gateway.dispatcher.is_subscribed
            response = await http.post("/v1/completions", json=COMPLETION)
            assert response.status_code == 200, response.text


async def test_lost_pubsub_events_are_recovered_from_the_job(
        settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "IDLE_CHECK_S", 0.1)
    async with gateway_client(settings) as (http, _), \
            running_worker(settings, tiny_model_info(), publish=False):
        response = await http.post("/v1/completions", json=COMPLETION)
        assert response.json()["choices"][0]["text"] == "Hello, world!"
        response = await http.post("/v1/completions", json={**COMPLETION, "stream": True})
        chunks = [json.loads(d) for _, d in parse_sse(response.text)[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, world!"


async def test_malformed_event_batches_are_dropped(settings: Settings,
                                                   redis: aioredis.Redis) -> None:
    async with gateway_client(settings) as (http, app), \
            running_worker(settings, tiny_model_info()):
        dispatcher = app.state.gateway.dispatcher
        await redis.publish(dispatcher.channel, b"\xc1 not msgpack")
        response = await http.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == "Hello, world!"


async def test_still_queued_past_the_timeout_is_504_queue_timeout_and_cancels(
        redis_url: str, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """No worker ever reads the request (the only worker registered serves nothing): the
    gateway gives up at the deadline, answers 504 queue_timeout and flags it cancelled, so
    a worker that reads it later skips it."""
    monkeypatch.setattr(reader, "QUEUE_TIMEOUT_GRACE_S", 0.1)
    monkeypatch.setattr(reader, "IDLE_CHECK_S", 0.05)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, request_timeout_s=0.3)
    register_worker(settings, tiny_model_info())
    async with gateway_client(settings) as (http, _):
        response = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "queue_timeout"
    [entry] = await redis.xrange(KEYS.requests_stream("tiny", "interactive"))
    request = unpack_request(entry[1][b"m"])
    assert await redis.get(KEYS.cancel(request.id)) == b"1"
    assert await redis.hget(KEYS.job(request.id), "status") == b"cancelled"


async def test_client_leaving_a_stream_cancels_its_request(settings: Settings,
                                                           redis: aioredis.Redis) -> None:
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        async with running_worker(settings, tiny_model_info()), \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            body = {"model": "tiny", "prompt": "SLOW", "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        request_id = json.loads(line[5:])["id"]
                        break
            for _ in range(100):
                if await redis.get(KEYS.cancel(request_id)):
                    break
                await asyncio.sleep(0.02)
            assert await redis.get(KEYS.cancel(request_id)) == b"1"
    finally:
        server.should_exit = True
        await serving


def test_gateway_never_imports_torch() -> None:
    script = """
import asyncio, sys
from gateway.app import create_app
from tests.support.model import tiny_model_info
from gateway.tokenize import PromptTokenizer
from shared.settings import Settings
create_app(Settings())
tok = PromptTokenizer(tiny_model_info())
assert tok.encode_chat([{"role": "user", "content": "hi"}])
assert tok.encode_prompt("hi")
bad = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(bad)
sys.exit(1 if bad else 0)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]"
