"""Gateway auth: 401s, open health routes, job ownership, per-key limits over HTTP, Redis
password in the URL."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from shared.apikeys import create_key, revoke_key
from shared.keys import Keys
from shared.redis_conn import async_client
from shared.settings import Settings
from tests.conftest import free_port
from tests.support.gateway import gateway_client
from tests.support.model import tiny_model_info
from tests.support.worker import register_worker, running_worker

PREFIX = "tfauth"
KEYS = Keys(PREFIX)
JOB = {"prompt": "hi", "max_tokens": 4}


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = async_client(Settings(redis_url=redis_url))
    # registered, not serving
    register_worker(Settings(redis_url=redis_url, key_prefix=PREFIX), tiny_model_info())
    yield client
    await client.aclose()


@pytest.fixture
def sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _settings(redis_url: str, **overrides: object) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, auth=True, **overrides)


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwdw=="},
    {"Authorization": "Bearer tf-wrong"}, {"Authorization": "Bearer " + "x" * 5000},
    {"Authorization": b"Bearer caf\xe9"},  # not ASCII: must not break the comparison
], ids=["missing", "empty", "basic", "unknown", "huge", "latin1"])
async def test_requests_without_a_valid_key_get_401(redis_url: str, aredis: aioredis.Redis,
                                                    headers: dict[str, Any]) -> None:
    async with gateway_client(_settings(redis_url, api_keys=["static-1"])) as (http, _):
        for method, path in (("POST", "/v1/jobs"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/jobs/job-x"), ("DELETE", "/v1/jobs/job-x"),
                             ("GET", "/v1/jobs/job-x/stream")):
            response = await http.request(method, path, json=JOB, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["type"] == "authentication_error"
            assert error["code"] == "invalid_api_key"
    assert await aredis.xlen(KEYS.requests_stream("tiny")) == 0


async def test_health_and_schema_stay_open(redis_url: str, aredis: aioredis.Redis) -> None:
    async with gateway_client(_settings(redis_url)) as (http, _):
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/openapi.json")).status_code == 200


async def test_static_and_stored_keys_work_and_revocation_is_seen(
        redis_url: str, aredis: aioredis.Redis, sync: redis.Redis) -> None:
    key, record = create_key(sync, KEYS, "alice")
    settings = _settings(redis_url, api_keys=["static-1"], auth_cache_s=0.5)
    async with gateway_client(settings) as (http, _):
        for token in ("static-1", key):
            job = await http.post("/v1/jobs", json=JOB, headers=_bearer(token))
            assert job.status_code == 202, job.text
        assert (await http.get("/v1/models", headers=_bearer(key))).status_code == 200
        revoke_key(sync, KEYS, record.id)
        assert (await http.post("/v1/jobs", json=JOB, headers=_bearer(key))).status_code == 202
        await asyncio.sleep(0.55)  # the cache: a revoked key works until its entry expires
        revoked = await http.post("/v1/jobs", json=JOB, headers=_bearer(key))
        assert revoked.status_code == 401
        assert "revoked" in revoked.json()["error"]["message"]


async def test_known_keys_are_looked_up_once_per_cache_period(
        redis_url: str, aredis: aioredis.Redis, sync: redis.Redis) -> None:
    key, _ = create_key(sync, KEYS, "cached")
    async with gateway_client(_settings(redis_url)) as (http, app):
        auth = app.state.gateway.auth
        for _ in range(3):
            assert (await http.get("/v1/models", headers=_bearer(key))).status_code == 200
        assert len(auth._cache) == 1
        sync.delete(KEYS.api_keys)  # Redis no longer knows it; the cache still does
        assert (await http.get("/v1/models", headers=_bearer(key))).status_code == 200
        auth.forget()
        assert (await http.get("/v1/models", headers=_bearer(key))).status_code == 401


async def test_a_job_is_visible_only_to_the_key_that_created_it(
        redis_url: str, aredis: aioredis.Redis, sync: redis.Redis) -> None:
    mine, _ = create_key(sync, KEYS, "mine")
    theirs, _ = create_key(sync, KEYS, "theirs")
    async with running_worker(_settings(redis_url), tiny_model_info()), \
            gateway_client(_settings(redis_url, api_keys=["static-1"])) as (http, _):
        job_id = (await http.post("/v1/jobs", json=JOB, headers=_bearer(mine))).json()["id"]
        live = await http.post("/v1/chat/completions", headers=_bearer(mine), json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert live.status_code == 200, live.text
        for own_id in (job_id, live.json()["id"]):
            assert (await http.get(f"/v1/jobs/{own_id}", headers=_bearer(mine))
                    ).status_code == 200
            for other in (theirs, "static-1"):
                for method, path in (("GET", f"/v1/jobs/{own_id}"),
                                     ("GET", f"/v1/jobs/{own_id}/stream"),
                                     ("DELETE", f"/v1/jobs/{own_id}")):
                    resp = await http.request(method, path, headers=_bearer(other))
                    assert resp.status_code == 404, (method, path)
                    assert resp.json()["error"]["code"] == "job_not_found"
        stream = await http.get(f"/v1/jobs/{job_id}/stream", headers=_bearer(mine))
        assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
        assert (await http.delete(f"/v1/jobs/{job_id}", headers=_bearer(mine))
                ).status_code == 200
    assert await aredis.get(KEYS.cancel(job_id)) is None  # the 404 DELETEs changed nothing


async def test_per_key_limits_answer_429_with_retry_after(
        redis_url: str, aredis: aioredis.Redis, sync: redis.Redis) -> None:
    by_requests, _ = create_key(sync, KEYS, "rpm", rpm=2)
    by_tokens, _ = create_key(sync, KEYS, "tpm", tpm=300)
    unlimited, _ = create_key(sync, KEYS, "free", rpm=0, tpm=0)
    settings = _settings(redis_url, rate_limit_rpm=3)  # the default for keys without their own
    async with gateway_client(settings) as (http, _):
        codes = [(await http.post("/v1/jobs", json=JOB, headers=_bearer(by_requests)))
                 for _ in range(3)]
        assert [r.status_code for r in codes] == [202, 202, 429]
        assert int(codes[2].headers["retry-after"]) >= 1
        assert codes[2].json()["error"]["type"] == "rate_limit_error"
        assert "2 requests per minute" in codes[2].json()["error"]["message"]

        big = {"prompt": "hi", "max_tokens": 200}  # 2 prompt tokens + 200 counted
        first = await http.post("/v1/jobs", json=big, headers=_bearer(by_tokens))
        second = await http.post("/v1/jobs", json=big, headers=_bearer(by_tokens))
        assert (first.status_code, second.status_code) == (202, 429)
        assert int(second.headers["retry-after"]) >= 1
        assert "300 tokens per minute" in second.json()["error"]["message"]

        assert all([(await http.post("/v1/jobs", json=JOB, headers=_bearer(unlimited))
                     ).status_code == 202 for _ in range(5)])
    assert await aredis.xlen(KEYS.requests_stream("tiny")) == 2 + 1 + 5


async def test_redis_password_goes_in_the_url() -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not on PATH")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--requirepass", "s3cret"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            try:
                if redis.Redis.from_url(url).ping():
                    break
            except redis.ConnectionError:
                await asyncio.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").set("x", "1")
        register_worker(Settings(redis_url=url, key_prefix=PREFIX), tiny_model_info())
        async with gateway_client(Settings(redis_url=url, key_prefix=PREFIX)) as (http, _):
            assert (await http.get("/readyz")).status_code == 200
            assert (await http.post("/v1/jobs", json=JOB)).status_code == 202
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_auth_off_needs_no_key_and_applies_no_limits(redis_url: str,
                                                           aredis: aioredis.Redis) -> None:
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, rate_limit_rpm=1)
    async with gateway_client(settings) as (http, _):
        for _ in range(3):
            response = await http.post("/v1/jobs", json=JOB, headers=_bearer("anything"))
            assert response.status_code == 202
