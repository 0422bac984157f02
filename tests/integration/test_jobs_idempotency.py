"""Issue 17: ``Idempotency-Key`` on POST /v1/jobs, chat and completions (Stripe's rules)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from tests.support.gateway import gateway_client, parse_sse
from tests.support.model import tiny_model_info
from tests.support.worker import register_worker, running_worker

PREFIX = "tftest"
KEYS = Keys(PREFIX)
JOB = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, default_max_tokens=16,
                    backlog_limit=0)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(settings) as (http, _):
        yield http


async def queued_entries(redis: aioredis.Redis) -> int:
    return sum([await redis.xlen(KEYS.requests_stream("tiny", lane))
                for lane in ("interactive", "batch")])


async def test_a_retry_with_the_same_key_returns_the_first_job(
        settings: Settings, client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    register_worker(settings, tiny_model_info())  # served, but nothing reads the queue
    headers = {"Idempotency-Key": "order-1"}
    first = await client.post("/v1/jobs", json=JOB, headers=headers)
    again = await client.post("/v1/jobs", content=json.dumps(JOB, indent=3).encode(),
                              headers={**headers, "content-type": "application/json"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await queued_entries(redis) == 1


async def test_fifty_concurrent_duplicates_make_exactly_one_job(
        settings: Settings, client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    async with running_worker(settings, tiny_model_info()) as worker:
        headers = {"Idempotency-Key": "burst"}
        responses = await asyncio.gather(*[client.post("/v1/jobs", json=JOB, headers=headers)
                                           for _ in range(50)])
        assert {r.status_code for r in responses} == {202}
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1
        replays = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
        assert len(replays) == 49
        job_id = ids.pop()
        for _ in range(500):
            if (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded":
                break
            await asyncio.sleep(0.01)
        assert worker.served == [job_id]  # one job ran
    assert await queued_entries(redis) <= 1  # (acknowledged entries are trimmed later)
    listed = (await client.get("/v1/jobs")).json()["data"]
    assert [job["id"] for job in listed] == [job_id]


async def test_the_same_key_with_another_body_is_a_422(settings: Settings,
                                                      client: httpx.AsyncClient) -> None:
    register_worker(settings, tiny_model_info())
    headers = {"Idempotency-Key": "k"}
    assert (await client.post("/v1/jobs", json=JOB, headers=headers)).status_code == 202
    other = await client.post("/v1/jobs", json={**JOB, "max_tokens": 3}, headers=headers)
    assert other.status_code == 422
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert error["param"] == "Idempotency-Key"
    assert "new key" in error["message"]
    # the same key on another endpoint is another request too
    chat = await client.post("/v1/chat/completions", json=JOB, headers=headers)
    assert chat.status_code == 422


async def test_a_refused_request_binds_nothing(settings: Settings, client: httpx.AsyncClient,
                                               redis: aioredis.Redis) -> None:
    register_worker(settings, tiny_model_info())
    headers = {"Idempotency-Key": "fix-and-retry"}
    bad = await client.post("/v1/jobs", json={**JOB, "max_tokens": 10**6}, headers=headers)
    assert bad.status_code == 400
    good = await client.post("/v1/jobs", json=JOB, headers=headers)
    assert good.status_code == 202 and "idempotent-replayed" not in good.headers
    assert await queued_entries(redis) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\tkey"])
async def test_a_malformed_key_is_a_400(settings: Settings, client: httpx.AsyncClient,
                                        key: str) -> None:
    register_worker(settings, tiny_model_info())
    response = await client.post("/v1/jobs", json=JOB,
                                 headers=[("Idempotency-Key", key.encode())])
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "Idempotency-Key"


async def test_keys_are_scoped_to_the_api_key(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, auth=True,
                        api_keys=["tf-alice", "tf-bob"], default_max_tokens=16)
    register_worker(settings, tiny_model_info())
    async with gateway_client(settings) as (http, _):
        ids = []
        for key in ("tf-alice", "tf-bob"):
            response = await http.post("/v1/jobs", json=JOB, headers={
                "Authorization": f"Bearer {key}", "Idempotency-Key": "shared"})
            assert response.status_code == 202 and "idempotent-replayed" not in response.headers
            ids.append(response.json()["id"])
        assert ids[0] != ids[1]


async def test_chat_and_completion_retries_replay_the_first_answer(
        settings: Settings, client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    async with running_worker(settings, tiny_model_info()) as worker:
        headers = {"Idempotency-Key": "chat-1"}
        first = await client.post("/v1/chat/completions", json=JOB, headers=headers)
        again = await client.post("/v1/chat/completions", json=JOB, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        body, replayed = first.json(), again.json()
        assert replayed["id"] == body["id"]
        assert replayed["choices"] == body["choices"]
        assert replayed["usage"] == body["usage"]

        stream = {"model": "tiny", "prompt": "hi", "stream": True}
        headers = {"Idempotency-Key": "cmpl-1"}
        first = await client.post("/v1/completions", json=stream, headers=headers)
        again = await client.post("/v1/completions", json=stream, headers=headers)
        assert again.headers["idempotent-replayed"] == "true"
        assert parse_sse(again.text) == parse_sse(first.text)
        assert len(worker.served) == 2
