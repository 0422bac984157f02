"""Issue 17: ``GET /v1/jobs`` (the caller's jobs, OpenAI list shape) and
``DELETE /v1/jobs/{id}?purge=true``, each scoped to the caller's key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.settings import Settings
from tests.support.gateway import gateway_client
from tests.support.model import tiny_model_info
from tests.support.worker import register_worker, running_worker

PREFIX = "tftest"
KEYS = Keys(PREFIX)
ALICE = {"Authorization": "Bearer tf-alice"}
BOB = {"Authorization": "Bearer tf-bob"}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, default_max_tokens=16,
                    auth=True, api_keys=["tf-alice", "tf-bob"])


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    register_worker(settings, tiny_model_info())
    async with gateway_client(settings) as (http, _):
        yield http


async def submit(client: httpx.AsyncClient, headers: dict[str, str],
                 prompt: str = "hi") -> str:
    response = await client.post("/v1/jobs", json={"model": "tiny", "prompt": prompt},
                                 headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def finished(client: httpx.AsyncClient, job_id: str, headers: dict[str, str],
                   ) -> dict[str, Any]:
    for _ in range(500):
        body: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} did not finish")


async def test_a_key_lists_its_jobs_newest_first_in_pages(settings: Settings,
                                                         client: httpx.AsyncClient) -> None:
    async with running_worker(settings, tiny_model_info()):
        chat = await client.post("/v1/chat/completions", headers=ALICE, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200  # a chat request is not a job: not listed
    mine = [await submit(client, ALICE) for _ in range(5)]
    await submit(client, BOB)

    page = (await client.get("/v1/jobs", params={"limit": 2}, headers=ALICE)).json()
    assert page["object"] == "list"
    assert [job["id"] for job in page["data"]] == mine[::-1][:2]
    assert page["first_id"] == mine[4] and page["last_id"] == mine[3]
    assert page["has_more"] is True
    assert page["data"][0]["object"] == "job" and page["data"][0]["status"] == "queued"
    seen = [job["id"] for job in page["data"]]
    while page["has_more"]:
        page = (await client.get("/v1/jobs", params={"limit": 2, "after": page["last_id"]},
                                 headers=ALICE)).json()
        seen += [job["id"] for job in page["data"]]
    assert seen == mine[::-1]
    assert page["has_more"] is False and len(page["data"]) == 1


async def test_the_list_filters_by_status(settings: Settings,
                                          client: httpx.AsyncClient) -> None:
    queued = [await submit(client, ALICE) for _ in range(3)]
    cancelled = (await client.delete(f"/v1/jobs/{queued[1]}", headers=ALICE)).json()
    assert cancelled["status"] == "cancelled"
    only = (await client.get("/v1/jobs", params={"status": "cancelled"}, headers=ALICE)).json()
    assert [job["id"] for job in only["data"]] == [queued[1]]
    assert only["has_more"] is False
    still = (await client.get("/v1/jobs", params={"status": "queued"}, headers=ALICE)).json()
    assert [job["id"] for job in still["data"]] == [queued[2], queued[0]]
    bad = await client.get("/v1/jobs", params={"status": "done"}, headers=ALICE)
    assert bad.status_code == 400 and "status" in bad.json()["error"]["message"]
    too_many = await client.get("/v1/jobs", params={"limit": 101}, headers=ALICE)
    assert too_many.status_code == 400


async def test_after_must_be_one_of_the_callers_jobs(client: httpx.AsyncClient) -> None:
    bobs = await submit(client, BOB)
    response = await client.get("/v1/jobs", params={"after": bobs}, headers=ALICE)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "after"


async def test_the_index_forgets_jobs_older_than_the_ttl(settings: Settings,
                                                        client: httpx.AsyncClient,
                                                        redis: aioredis.Redis) -> None:
    first = await submit(client, ALICE)
    indexes = [key.decode() for key in await redis.keys(KEYS.owner_jobs("*"))]
    assert len(indexes) == 1
    index = indexes[0]
    await redis.zadd(index, {"job-ancient": 1.0, "job-expired": 2.0})
    assert await redis.ttl(index) > 0  # the whole index goes when the key stops using it
    second = await submit(client, ALICE)
    assert [m.decode() for m in await redis.zrevrange(index, 0, -1)] == [second, first]
    await redis.delete(KEYS.job(first))  # expired: dropped from the index when listed
    listed = (await client.get("/v1/jobs", headers=ALICE)).json()
    assert [job["id"] for job in listed["data"]] == [second]
    assert await redis.zscore(index, first) is None


async def test_purge_removes_a_finished_job_now(settings: Settings, client: httpx.AsyncClient,
                                               redis: aioredis.Redis) -> None:
    async with running_worker(settings, tiny_model_info()):
        job_id = await submit(client, ALICE)
        await finished(client, job_id, ALICE)
    assert await redis.exists(KEYS.job(job_id), KEYS.job_text(job_id)) == 2

    assert (await client.delete(f"/v1/jobs/{job_id}", params={"purge": "true"},
                                headers=BOB)).status_code == 404  # not Bob's
    response = await client.delete(f"/v1/jobs/{job_id}", params={"purge": "true"},
                                   headers=ALICE)
    assert response.status_code == 200
    assert response.json() == {"id": job_id, "object": "job", "deleted": True}
    assert await redis.exists(KEYS.job(job_id), KEYS.job_text(job_id),
                              KEYS.job_events(job_id)) == 0
    assert (await client.get(f"/v1/jobs/{job_id}", headers=ALICE)).status_code == 404
    assert (await client.get("/v1/jobs", headers=ALICE)).json()["data"] == []
    again = await client.delete(f"/v1/jobs/{job_id}", params={"purge": "true"}, headers=ALICE)
    assert again.status_code == 404


async def test_an_unfinished_job_is_not_purged(client: httpx.AsyncClient,
                                               redis: aioredis.Redis) -> None:
    job_id = await submit(client, ALICE)
    response = await client.delete(f"/v1/jobs/{job_id}?purge=true", headers=ALICE)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "job_not_finished" and "cancel it first" in error["message"]
    assert await redis.exists(KEYS.job(job_id)) == 1
    await client.delete(f"/v1/jobs/{job_id}", headers=ALICE)  # cancel, then purge
    assert (await client.delete(f"/v1/jobs/{job_id}?purge=true",
                                headers=ALICE)).status_code == 200


async def test_purge_frees_the_jobs_idempotency_key(client: httpx.AsyncClient) -> None:
    headers = {**ALICE, "Idempotency-Key": "once"}
    job_id = (await client.post("/v1/jobs", json={"model": "tiny", "prompt": "hi"},
                                headers=headers)).json()["id"]
    await client.delete(f"/v1/jobs/{job_id}", headers=ALICE)
    await client.delete(f"/v1/jobs/{job_id}?purge=true", headers=ALICE)
    again = await client.post("/v1/jobs", json={"model": "tiny", "prompt": "hi"},
                              headers=headers)
    assert again.status_code == 202 and again.json()["id"] != job_id
