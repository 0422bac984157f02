"""Issue 17: job webhooks, from the job's terminal write through the dispatcher to a receiver
on 127.0.0.1 that verifies them with ``standardwebhooks`` (the example receiver)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.redis_conn import async_client
from shared.settings import Settings
from tests.support.gateway import gateway_client
from tests.support.model import tiny_model_info
from tests.support.webhooks import receiving
from tests.support.worker import register_worker, running_worker
from webhooks.dispatcher import WebhookDispatcher
from webhooks.main import new_secret

PREFIX = "tftest"
KEYS = Keys(PREFIX)
SECRET = new_secret()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, default_max_tokens=16,
                    webhook_secret=SECRET, webhook_allow_private=True,
                    webhook_retry_base_s=0.02, webhook_timeout_s=2.0)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(settings) as (http, _):
        yield http


@contextlib.asynccontextmanager
async def dispatching(settings: Settings) -> AsyncIterator[WebhookDispatcher]:
    redis = async_client(settings)
    dispatcher = WebhookDispatcher(settings, redis)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield dispatcher
    finally:
        stop.set()
        await task
        await dispatcher.client.aclose()
        await redis.aclose()


async def job_with_webhook(client: httpx.AsyncClient, url: str, prompt: str = "hi",
                           **extra: Any) -> str:
    response = await client.post("/v1/jobs", json={"model": "tiny", "prompt": prompt,
                                                   "webhook": url, **extra})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["webhook"] == url
    return str(body["id"])


async def nothing_left(redis: aioredis.Redis) -> bool:
    sizes = [await redis.xlen(KEYS.webhook_events), await redis.zcard(KEYS.webhook_due),
             await redis.hlen(KEYS.webhook_attempts)]
    return sizes == [0, 0, 0]


async def test_completed_events_arrive_signed_after_two_failed_deliveries(
        settings: Settings, client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    with receiving(SECRET, fail_first=2) as receiver:
        async with running_worker(settings, tiny_model_info()), dispatching(settings):
            ids = [await job_with_webhook(client, receiver.url) for _ in range(5)]
            await receiver.until(set(ids))
            for job_id in ids:
                attempts = receiver.attempts_of(f"msg_{job_id}_completed")
                assert [a.status for a in attempts] == [500, 500, 204]
            views = {job_id: (await client.get(f"/v1/jobs/{job_id}")).json() for job_id in ids}
        for event, job in receiver.accepted:  # each verified by standardwebhooks
            assert event == "completed"
            assert job == views[job["id"]]  # the body is the job as GET shows it
            assert job["status"] == "succeeded" and job["text"] == "Hello, world!"
    assert sorted(receiver.accepted_ids()) == sorted(ids)  # once each
    assert await nothing_left(redis)


async def test_start_and_completed_when_the_filter_asks(
        settings: Settings, client: httpx.AsyncClient) -> None:
    with receiving(SECRET) as receiver:
        async with running_worker(settings, tiny_model_info()), dispatching(settings):
            job_id = await job_with_webhook(client, receiver.url, prompt="SLOW",
                                            webhook_events_filter=["completed", "start"])
            await receiver.until({job_id})
            await receiver.until({job_id}, event="start")
    events = {event: job for event, job in receiver.accepted}
    assert events["start"]["status"] == "running" and events["start"]["text"] == ""
    assert events["completed"]["status"] == "succeeded"
    assert events["completed"]["webhook_events_filter"] == ["start", "completed"]


async def test_a_job_cancelled_while_queued_reports_completed(
        settings: Settings, client: httpx.AsyncClient) -> None:
    register_worker(settings, tiny_model_info())  # nothing reads the queue
    with receiving(SECRET) as receiver:
        job_id = await job_with_webhook(client, receiver.url,
                                        webhook_events_filter=["start", "completed"])
        await client.delete(f"/v1/jobs/{job_id}")
        async with dispatching(settings):
            await receiver.until({job_id})
    assert [(event, job["status"]) for event, job in receiver.accepted] == [
        ("completed", "cancelled")]


async def test_an_event_is_dead_lettered_after_the_last_attempt(
        settings: Settings, client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    settings = settings.model_copy(update={"webhook_max_attempts": 3})
    with receiving(SECRET, fail_always=True) as receiver:
        async with running_worker(settings, tiny_model_info()), dispatching(settings):
            job_id = await job_with_webhook(client, receiver.url)
            for _ in range(2000):
                if await redis.xlen(KEYS.webhook_dead):
                    break
                await asyncio.sleep(0.01)
    assert [a.status for a in receiver.attempts] == [500, 500, 500]
    [(_, dead)] = await redis.xrange(KEYS.webhook_dead)
    assert dead[b"job"].decode() == job_id and dead[b"attempts"] == b"3"
    assert dead[b"error"] == b"HTTP 500" and dead[b"url"].decode() == receiver.url
    assert dead[b"event"] == b"completed" and b'"status":"succeeded"' in dead[b"body"]
    assert await nothing_left(redis)


async def test_the_dispatcher_refuses_a_host_that_became_private(
        settings: Settings, client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    """The gateway allowed it; the dispatcher (which resolves again) does not."""
    strict = settings.model_copy(update={"webhook_allow_private": False,
                                         "webhook_max_attempts": 1})
    with receiving(SECRET) as receiver:
        async with running_worker(settings, tiny_model_info()), dispatching(strict):
            await job_with_webhook(client, receiver.url)
            for _ in range(2000):
                if await redis.xlen(KEYS.webhook_dead):
                    break
                await asyncio.sleep(0.01)
    assert receiver.attempts == []
    [(_, dead)] = await redis.xrange(KEYS.webhook_dead)
    assert b"non-public address" in dead[b"error"]


@pytest.mark.parametrize("url", [
    "ftp://example.com/hook", "file:///etc/passwd", "gopher://example.com/", "http:///hook",
    "not a url", "http://127.0.0.1:9000/hook", "http://localhost/hook", "http://10.1.2.3/h",
    "http://192.168.0.10/h", "http://169.254.169.254/latest/meta-data", "http://[::1]/h",
    "http://[::ffff:127.0.0.1]/h", "http://100.64.0.1/h", "http://0.0.0.0/h",
])
async def test_a_refused_webhook_is_a_400_at_submission(
        settings: Settings, url: str, redis: aioredis.Redis) -> None:
    strict = settings.model_copy(update={"webhook_allow_private": False})
    register_worker(strict, tiny_model_info())
    async with gateway_client(strict) as (http, _):
        response = await http.post("/v1/jobs", json={"model": "tiny", "prompt": "hi",
                                                     "webhook": url})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "webhook" and error["code"] == "invalid_webhook"
    assert await redis.xlen(KEYS.requests_stream("tiny")) == 0


async def test_a_public_webhook_is_accepted(settings: Settings) -> None:
    strict = settings.model_copy(update={"webhook_allow_private": False})
    register_worker(strict, tiny_model_info())
    async with gateway_client(strict) as (http, _):
        response = await http.post("/v1/jobs", json={  # an address literal: no DNS, no send
            "model": "tiny", "prompt": "hi", "webhook": "https://93.184.215.14/hook"})
    assert response.status_code == 202
    assert response.json()["webhook_events_filter"] == ["completed"]


async def test_webhook_fields_are_checked(settings: Settings, client: httpx.AsyncClient) -> None:
    register_worker(settings, tiny_model_info())
    base = {"model": "tiny", "prompt": "hi"}
    for extra, param in (({"webhook": "http://127.0.0.1/h", "webhook_events_filter": ["done"]},
                          "webhook_events_filter"),
                         ({"webhook": "http://127.0.0.1/h", "webhook_events_filter": []},
                          "webhook_events_filter"),
                         ({"webhook_events_filter": ["start"]}, "webhook_events_filter")):
        response = await client.post("/v1/jobs", json={**base, **extra})
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param
    off = settings.model_copy(update={"webhook_secret": None})
    async with gateway_client(off) as (http, _):
        response = await http.post("/v1/jobs", json={**base, "webhook": "http://127.0.0.1/h"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "webhooks_disabled"
