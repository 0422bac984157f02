"""API keys (static and stored hashed in Redis), job ownership, per-key rate limits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from gateway.testing import FakeWorker, gateway_client, tiny_model_info
from shared.apikeys import create_key, digest, list_keys, revoke_key
from shared.keys import Keys
from shared.ratelimit import RateLimiter
from shared.redis_conn import async_client
from shared.settings import Settings
from tests.integration.fleet import REPO

PREFIX = "tfauth"
KEYS = Keys(PREFIX)


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = async_client(Settings(redis_url=redis_url))
    await FakeWorker(client, KEYS, tiny_model_info()).register()
    yield client
    await client.aclose()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_stored_keys_authenticate_and_revoked_ones_do_not(
        redis_url: str, aredis: aioredis.Redis) -> None:
    sync = redis.Redis.from_url(redis_url)
    key, record = create_key(sync, KEYS, "alice")
    other, _ = create_key(sync, KEYS, "bob")
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, auth=True)
    async with gateway_client(settings) as (http, app):
        missing = await http.post("/v1/jobs", json={"prompt": "hi"})
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert (await http.post("/v1/jobs", json={"prompt": "hi"},
                                headers=_bearer("tf-wrong"))).status_code == 401
        job = await http.post("/v1/jobs", json={"prompt": "hi"}, headers=_bearer(key))
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        assert (await http.get(f"/v1/jobs/{job_id}", headers=_bearer(key))).status_code == 200
        for method in ("GET", "DELETE"):  # another key does not see it
            resp = await http.request(method, f"/v1/jobs/{job_id}", headers=_bearer(other))
            assert resp.status_code == 404
        stream = await http.get(f"/v1/jobs/{job_id}/stream", headers=_bearer(other))
        assert stream.status_code == 404
        assert (await http.get("/healthz")).status_code == 200  # health stays open
        revoke_key(sync, KEYS, record.id)
        app.state.gateway.auth._cache.clear()  # skip the few-seconds cache in a test
        revoked = await http.post("/v1/jobs", json={"prompt": "hi"}, headers=_bearer(key))
        assert revoked.status_code == 401
    assert [r.name for r in list_keys(sync, KEYS)] == ["alice", "bob"]


async def test_the_plaintext_key_is_never_stored(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    key, _ = create_key(sync, KEYS, "carol")
    dump = b""
    for name in sync.scan_iter():
        kind = sync.type(name)
        if kind == b"hash":
            dump += b"".join(k + v for k, v in sync.hgetall(name).items())
        elif kind == b"string":
            dump += sync.get(name) or b""
    assert key.encode() not in dump
    assert digest(key).encode() in dump


async def test_per_key_request_limit_answers_429_with_retry_after(
        redis_url: str, aredis: aioredis.Redis) -> None:
    sync = redis.Redis.from_url(redis_url)
    key, _ = create_key(sync, KEYS, "limited", rpm=2)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, auth=True)
    async with gateway_client(settings) as (http, _):
        codes = [(await http.post("/v1/jobs", json={"prompt": "hi"}, headers=_bearer(key)))
                 for _ in range(3)]
    assert [r.status_code for r in codes] == [202, 202, 429]
    assert int(codes[2].headers["retry-after"]) >= 1
    assert "requests per minute" in codes[2].json()["error"]["message"]


async def test_token_limit_and_atomicity_under_concurrency(aredis: aioredis.Redis) -> None:
    limiter = RateLimiter(aredis, KEYS)
    decisions = await asyncio.gather(*(limiter.check("k1", 0, 1000, 100) for _ in range(30)))
    assert sum(d.allowed for d in decisions) == 10  # never more than the budget
    denied = next(d for d in decisions if not d.allowed)
    assert denied.retry_after_s >= 1 and "tokens per minute" in denied.reason
    both = await asyncio.gather(*(limiter.check("k2", 5, 10_000, 1) for _ in range(12)))
    assert sum(d.allowed for d in both) == 5
    too_big = await limiter.check("k3", 0, 50, 60)
    assert not too_big.allowed and "more than" in too_big.reason
    assert (await limiter.check("k4", 0, 0, 10**9)).allowed  # unlimited: no Redis at all


def test_keys_cli_create_list_revoke(redis_url: str) -> None:
    env = dict(os.environ, TOKENFLEET_REDIS_URL=redis_url, TOKENFLEET_KEY_PREFIX=PREFIX)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shared.cli", "keys", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60, check=False)

    created = cli("create", "--name", "ci-bot", "--rpm", "60")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("tf-") and "shown once" in created.stderr
    listed = cli("list")
    assert "ci-bot" in listed.stdout and key not in listed.stdout
    key_id = next(line.split()[0] for line in listed.stdout.splitlines() if "ci-bot" in line)
    assert cli("revoke", key_id).returncode == 0
    assert " yes " in cli("list").stdout
    missing = cli("revoke", "key_nope")
    assert missing.returncode == 1 and "no API key" in missing.stderr


async def test_redis_password_goes_in_the_url(tmp_path: object) -> None:
    import shutil
    import time as _time

    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--save", "", "--requirepass", "s3cret"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://:s3cret@127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                if redis.Redis.from_url(url).ping():
                    break
            except redis.ConnectionError:
                _time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").set("x", "1")
        client = async_client(Settings(redis_url=url))
        await FakeWorker(client, KEYS, tiny_model_info()).register()
        async with gateway_client(Settings(redis_url=url, key_prefix=PREFIX)) as (http, _):
            assert (await http.get("/readyz")).status_code == 200
            assert (await http.post("/v1/jobs", json={"prompt": "hi"})).status_code == 202
        await client.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
