"""Backpressure, seeds for retries, optional model, queue timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.testing import FakeWorker, gateway_client, tiny_model_info
from shared.keys import Keys
from shared.protocol import unpack_request
from shared.redis_conn import async_client
from shared.settings import Settings

PREFIX = "tflimits"
KEYS = Keys(PREFIX)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = async_client(Settings(redis_url=redis_url))
    yield client
    await client.aclose()


async def _registered(redis: aioredis.Redis) -> FakeWorker:
    worker = FakeWorker(redis, KEYS, tiny_model_info())  # registered, never consuming
    await worker.register()
    return worker


async def _queued(redis: aioredis.Redis) -> list:  # type: ignore[type-arg]
    entries = await redis.xrange(KEYS.requests_stream("tiny", "interactive"))
    return [unpack_request(fields[b"m"]) for _, fields in entries]


async def test_full_queue_answers_429_with_retry_after(redis_url: str,
                                                       redis: aioredis.Redis) -> None:
    await _registered(redis)
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
    await _registered(redis)
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
    await _registered(redis)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX)
    async with gateway_client(settings) as (http, _):
        resp = await http.post("/v1/jobs", json={"prompt": "hello", "timeout": 30})
        assert resp.status_code == 202, resp.text
        bad = await http.post("/v1/jobs", json={"prompt": "hello", "timeout": -1})
        assert bad.status_code == 400
    [request] = await _queued(redis)
    assert request.model == "tiny"
    assert request.deadline is not None and 25 < request.deadline - request.created_at <= 30
