"""Backpressure, seeds for retries, optional model, queue timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shared.keys import WORKER_GROUP, Keys
from shared.protocol import unpack_request
from shared.redis_conn import async_client
from shared.settings import Settings
from tests.support.gateway import gateway_client
from tests.support.model import tiny_model_info
from tests.support.worker import register_worker

PREFIX = "tflimits"
KEYS = Keys(PREFIX)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = async_client(Settings(redis_url=redis_url))
    yield client
    await client.aclose()


def _registered(redis_url: str, name: str = "tiny", worker_id: str = "worker-idle") -> None:
    """A worker registered for ``name`` that never consumes (requests stay queued)."""
    register_worker(Settings(redis_url=redis_url, key_prefix=PREFIX), tiny_model_info(name),
                    worker_id)


async def _queued(redis: aioredis.Redis) -> list:  # type: ignore[type-arg]
    entries = await redis.xrange(KEYS.requests_stream("tiny", "interactive"))
    return [unpack_request(fields[b"m"]) for _, fields in entries]


async def test_full_queue_answers_429_with_retry_after(redis_url: str,
                                                       redis: aioredis.Redis) -> None:
    _registered(redis_url)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, backlog_limit=3)
    async with gateway_client(settings) as (http, app):
        for i in range(3):
            resp = await http.post("/v1/jobs", json={"model": "tiny", "prompt": f"hi {i}"})
            assert resp.status_code == 202, resp.text
            app.state.gateway.backlog._seen.clear()  # don't wait out the cache in a test
        full = await http.post("/v1/jobs", json={"model": "tiny", "prompt": "one more"})
        assert full.status_code == 429
        assert int(full.headers["retry-after"]) >= 1
        assert "queue" in full.json()["error"]["message"]
    assert len(await _queued(redis)) == 3


async def test_sampled_requests_get_a_seed_and_greedy_ones_do_not(
        redis_url: str, redis: aioredis.Redis) -> None:
    _registered(redis_url)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX)
    async with gateway_client(settings) as (http, _):
        for body in ({"prompt": "a", "temperature": 0.7}, {"prompt": "b", "temperature": 0},
                     {"prompt": "c", "temperature": 0.7, "seed": 5}):
            resp = await http.post("/v1/jobs", json={"model": "tiny", **body})
            assert resp.status_code == 202, resp.text
    sampled, greedy, seeded = await _queued(redis)
    assert isinstance(sampled.params.seed, int)
    assert greedy.params.seed is None
    assert seeded.params.seed == 5


async def test_model_may_be_omitted_when_one_is_served_and_timeout_sets_a_deadline(
        redis_url: str, redis: aioredis.Redis) -> None:
    _registered(redis_url)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX)
    async with gateway_client(settings) as (http, _):
        resp = await http.post("/v1/jobs", json={"prompt": "hello", "timeout": 30})
        assert resp.status_code == 202, resp.text
        bad = await http.post("/v1/jobs", json={"prompt": "hello", "timeout": -1})
        assert bad.status_code == 400
    [request] = await _queued(redis)
    assert request.model == "tiny"
    assert request.deadline is not None and 25 < request.deadline - request.created_at <= 30


async def test_backlog_counts_undelivered_and_pending_entries_not_acked_ones(
        redis_url: str, redis: aioredis.Redis) -> None:
    _registered(redis_url)
    interactive = KEYS.requests_stream("tiny", "interactive")
    batch = KEYS.requests_stream("tiny", "batch")
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, backlog_limit=6)
    async with gateway_client(settings) as (http, app):
        backlog = app.state.gateway.backlog
        for lane, n in (("interactive", 5), ("batch", 1)):
            for i in range(n):
                resp = await http.post("/v1/jobs", json={"prompt": f"{lane} {i}", "lane": lane})
                assert resp.status_code == 202, resp.text
                backlog._seen.clear()
                if lane == "interactive" and i == 2:  # a worker group appears: 3 undelivered
                    await redis.xgroup_create(interactive, WORKER_GROUP, id="0")
                    await redis.xgroup_create(batch, WORKER_GROUP, id="0", mkstream=True)
                    replies = await redis.xreadgroup(WORKER_GROUP, "w1", {interactive: ">"},
                                                     count=2)
                    await redis.xack(interactive, WORKER_GROUP, replies[0][1][0][0])
        # interactive: 1 acked (not counted), 1 pending, 3 undelivered; batch: 1 undelivered
        assert await backlog.size("tiny") == 5
        assert (await http.post("/v1/jobs", json={"prompt": "fits"})).status_code == 202
        backlog._seen.clear()
        full = await http.post("/v1/jobs", json={"prompt": "one more"})
        assert full.status_code == 429 and "is full" in full.json()["error"]["message"]


async def test_model_must_be_named_when_several_are_served(redis_url: str,
                                                           redis: aioredis.Redis) -> None:
    _registered(redis_url)
    _registered(redis_url, "other", "w-other")
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX)
    async with gateway_client(settings) as (http, _):
        resp = await http.post("/v1/jobs", json={"prompt": "hello"})
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["param"] == "model" and "other, tiny" in error["message"]
        named = await http.post("/v1/jobs", json={"prompt": "hello", "model": "other"})
        assert named.status_code == 202, named.text


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("functions", [{"name": "f"}]), ("tool_choice", "required"), ("n", 2), ("logprobs", True),
])
async def test_unsupported_features_are_refused_by_name(redis_url: str, redis: aioredis.Redis,
                                                        field: str, value: object) -> None:
    _registered(redis_url)
    async with gateway_client(Settings(redis_url=redis_url, key_prefix=PREFIX)) as (http, _):
        resp = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], field: value})
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == field
        ok = await http.post("/v1/jobs", json={"prompt": "hi", "tool_choice": "none"})
        assert ok.status_code == 202, ok.text


async def test_a_gateway_that_is_shutting_down_refuses_new_generations(
        redis_url: str, redis: aioredis.Redis) -> None:
    _registered(redis_url)
    async with gateway_client(Settings(redis_url=redis_url, key_prefix=PREFIX)) as (http, app):
        app.state.gateway.is_shutting_down = True
        resp = await http.post("/v1/jobs", json={"prompt": "hi"})
        assert resp.status_code == 503 and "shutting down" in resp.json()["error"]["message"]
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200
    assert await _queued(redis) == []
