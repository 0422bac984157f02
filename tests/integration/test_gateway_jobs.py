"""Background jobs: 202 + Location, polling, late stream replay, cancel, owners."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from tests.support.gateway import gateway_client, parse_sse
from tests.support.model import tiny_model_info
from tests.support.worker import RunningWorker, register_worker, running_worker

PREFIX = "tftest"
KEYS = Keys(PREFIX)


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, default_max_tokens=16)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(settings) as (http, _):
        yield http


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[RunningWorker]:
    async with running_worker(settings, tiny_model_info()) as running:
        yield running


async def wait_for_status(client: httpx.AsyncClient, job_id: str, status: str) -> dict[str, Any]:
    for _ in range(200):
        body = (await client.get(f"/v1/jobs/{job_id}")).json()
        if body["status"] == status:
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} never reached {status}: {body}")


async def test_job_is_accepted_and_polled_to_success(client: httpx.AsyncClient,
                                                     redis: aioredis.Redis,
                                                     worker: RunningWorker) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "lane": "batch"}
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "job"
    assert job["status"] == "queued"
    assert job["kind"] == "chat"
    assert job["lane"] == "batch"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    # jobs are not live: the worker is told nobody listens
    assert await redis.xlen(KEYS.requests_stream("tiny", "batch")) == 1

    done = await wait_for_status(client, job["id"], "succeeded")
    assert done["text"] == "Hello, world!"
    assert done["finish_reason"] == "stop"
    assert done["completion_tokens"] == 4
    assert done["prompt_tokens"] == job["prompt_tokens"] > 0
    assert done["worker"] == worker.worker_id
    timings = done["timings"]
    assert timings["queue_s"] is not None and timings["queue_s"] >= 0
    assert timings["total_s"] >= timings["queue_s"]


async def test_job_stream_replays_everything_to_a_late_reader(client: httpx.AsyncClient,
                                                              worker: RunningWorker) -> None:
    job = (await client.post("/v1/jobs", json={"model": "tiny", "prompt": "hi"})).json()
    await wait_for_status(client, job["id"], "succeeded")
    response = await client.get(f"/v1/jobs/{job['id']}/stream")
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello, world!"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_job_stream_follows_a_running_job(client: httpx.AsyncClient,
                                                worker: RunningWorker) -> None:
    job = (await client.post("/v1/jobs", json={"model": "tiny", "prompt": "SLOW",
                                               "stream": True})).json()
    await wait_for_status(client, job["id"], "running")
    response = await client.get(f"/v1/jobs/{job['id']}/stream")
    chunks = [json.loads(d) for _, d in parse_sse(response.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello, world!"


async def test_failed_job(client: httpx.AsyncClient, worker: RunningWorker) -> None:
    job = (await client.post("/v1/jobs", json={"model": "tiny", "prompt": "FAIL"})).json()
    failed = await wait_for_status(client, job["id"], "failed")
    assert failed["error"] == "the fake model failed"
    events = parse_sse((await client.get(f"/v1/jobs/{job['id']}/stream")).text)
    assert json.loads(events[-2][1])["error"]["message"] == "the fake model failed"


async def test_cancel_a_queued_job(client: httpx.AsyncClient, redis: aioredis.Redis,
                                   settings: Settings) -> None:
    register_worker(settings, tiny_model_info())  # registered, not serving
    job = (await client.post("/v1/jobs", json={"model": "tiny", "prompt": "hi"})).json()
    response = await client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert await redis.get(KEYS.cancel(job["id"])) == b"1"
    events = parse_sse((await client.get(f"/v1/jobs/{job['id']}/stream")).text)
    final, usage = (json.loads(data) for _, data in events[-3:-1])
    assert final["choices"][0]["finish_reason"] == "cancelled"
    assert usage["usage"]["completion_tokens"] == 0


async def test_cancel_a_running_job(client: httpx.AsyncClient, worker: RunningWorker) -> None:
    job = (await client.post("/v1/jobs", json={"model": "tiny", "prompt": "SLOW"})).json()
    await wait_for_status(client, job["id"], "running")
    response = await client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200
    assert response.json()["status"] in ("running", "cancelled")
    done = await wait_for_status(client, job["id"], "cancelled")
    assert done["finish_reason"] == "cancelled"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/jobs/job-nope", "/v1/jobs/a:b:text"])
async def test_unknown_job_is_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == 404
    assert "not found" in response.json()["error"]["message"]
    response = await client.get("/v1/jobs/job-nope/stream")
    assert response.status_code == 404


async def test_job_needs_messages_or_prompt(client: httpx.AsyncClient,
                                            worker: RunningWorker) -> None:
    response = await client.post("/v1/jobs", json={"model": "tiny"})
    assert response.status_code == 400
    assert "either messages" in response.json()["error"]["message"]


async def test_jobs_belong_to_their_key(redis_url: str, redis: aioredis.Redis,
                                        worker: RunningWorker) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, auth=True, api_keys=["k1", "k2"])
    async with gateway_client(settings) as (http, _):
        assert (await http.post("/v1/jobs", json={"model": "tiny", "prompt": "hi"})
                ).status_code == 401
        one = {"Authorization": "Bearer k1"}
        two = {"Authorization": "Bearer k2"}
        job = (await http.post("/v1/jobs", json={"model": "tiny", "prompt": "hi"},
                               headers=one)).json()
        assert (await http.get(f"/v1/jobs/{job['id']}", headers=one)).status_code == 200
        assert (await http.get(f"/v1/jobs/{job['id']}", headers=two)).status_code == 404
        assert (await http.delete(f"/v1/jobs/{job['id']}", headers=two)).status_code == 404
        bad = {"Authorization": "Bearer nope"}
        response = await http.get(f"/v1/jobs/{job['id']}", headers=bad)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
