"""Backpressure, seeds for retries, optional model, queue timeout, the worker's budgets and
sampling defaults, long prompts off the event loop, Redis refusing writes."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.tokenize import PromptTokenizer
from shared.keys import WORKER_GROUP, Keys
from shared.protocol import unpack_request
from shared.redis_conn import async_client
from shared.settings import Settings
from tests.conftest import RedisServer
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


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/chat/completions", "functions", [{"name": "f"}]),  # deprecated: send tools
    ("/v1/chat/completions", "tool_choice", "required"),  # a tool choice needs tools
    ("/v1/jobs", "n", 2),  # a job's record holds one text: n > 1 is for live requests
])
async def test_unsupported_features_are_refused_by_name(redis_url: str, redis: aioredis.Redis,
                                                        path: str, field: str,
                                                        value: object) -> None:
    _registered(redis_url)
    async with gateway_client(Settings(redis_url=redis_url, key_prefix=PREFIX)) as (http, _):
        body = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
                else {"prompt": "hi"})
        resp = await http.post(path, json={**body, field: value})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == field
        assert await _queued(redis) == []  # nothing half-written
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


# --- what the worker publishes: its KV budget and the model's sampling defaults -------------


def _register_model(redis_url: str, **info: object) -> None:
    register_worker(Settings(redis_url=redis_url, key_prefix=PREFIX), tiny_model_info(**info))


async def test_a_request_that_can_never_fit_the_workers_kv_budget_is_400(
        redis_url: str, redis: aioredis.Redis) -> None:
    _register_model(redis_url, max_batch_tokens=120)  # the context is 256
    async with gateway_client(Settings(redis_url=redis_url, key_prefix=PREFIX)) as (http, _):
        too_long = await http.post("/v1/jobs", json={"prompt": "a" * 100, "max_tokens": 50})
        assert too_long.status_code == 400, too_long.text
        error = too_long.json()["error"]
        assert error["param"] == "max_tokens"
        assert "hold at most 120 tokens per request" in error["message"]
        assert "max_tokens must be <= 20 (got 50)" in error["message"]
        prompt = await http.post("/v1/jobs", json={"prompt": "a" * 130})
        assert prompt.status_code == 400 and prompt.json()["error"]["param"] == "prompt"
        fits = await http.post("/v1/jobs", json={"prompt": "a" * 100})  # default capped
        assert fits.status_code == 202, fits.text
        assert fits.json()["max_tokens"] == 20
    [request] = await _queued(redis)
    assert len(request.prompt_token_ids) + request.params.max_tokens <= 120


async def test_unset_sampling_fields_get_the_models_defaults_and_set_ones_win(
        redis_url: str, redis: aioredis.Redis) -> None:
    _register_model(redis_url, generation_defaults={"temperature": 0.2, "top_p": 0.9})
    async with gateway_client(Settings(redis_url=redis_url, key_prefix=PREFIX)) as (http, _):
        card = (await http.get("/v1/models/tiny")).json()
        assert card["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9, "top_k": 0}
        listed = (await http.get("/v1/models")).json()["data"]
        assert listed[0]["sampling_defaults"] == card["sampling_defaults"]
        for body in ({"prompt": "a"}, {"prompt": "b", "temperature": 1.0, "top_p": 1.0},
                     {"prompt": "c", "temperature": 0}):
            assert (await http.post("/v1/jobs", json=body)).status_code == 202
    plain, own, greedy = await _queued(redis)
    assert (plain.params.temperature, plain.params.top_p) == (0.2, 0.9)
    assert (own.params.temperature, own.params.top_p) == (1.0, 1.0)
    assert (greedy.params.temperature, greedy.params.top_p) == (0.0, 0.9)


async def test_a_huge_prompt_tokenizes_off_the_event_loop(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a 1 MB prompt is being tokenized, a small request is answered."""
    entered, release = threading.Event(), threading.Event()
    encode = PromptTokenizer.encode_prompt

    def gated_encode(self: PromptTokenizer, prompt: str) -> list[int]:
        if len(prompt) > 100_000:
            entered.set()
            release.wait(10)  # on the event loop this would stall the small request too
        return encode(self, prompt)

    monkeypatch.setattr(PromptTokenizer, "encode_prompt", gated_encode)
    _registered(redis_url)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, max_body_bytes=2_000_000)
    async with gateway_client(settings) as (http, _):
        huge = asyncio.create_task(http.post("/v1/jobs", json={"prompt": "a" * 1_000_000}))
        assert await asyncio.to_thread(entered.wait, 10)
        small = await asyncio.wait_for(http.post("/v1/jobs", json={"prompt": "hi"}), 5)
        assert small.status_code == 202, small.text
        assert not huge.done()
        release.set()
        response = await huge
    assert response.status_code == 400  # 1 M tokens: longer than the context
    assert response.json()["error"]["param"] == "prompt"


# --- Redis refusing writes is not an outage ---------------------------------------------------


@pytest.mark.parametrize("refusal", ["oom", "misconf", "readonly"])
async def test_redis_refusing_writes_is_503_with_retry_after(
        redis_server: RedisServer, redis_url: str, redis: aioredis.Redis, refusal: str,
        caplog: pytest.LogCaptureFixture) -> None:
    _registered(redis_url)
    async with gateway_client(Settings(redis_url=redis_url, key_prefix=PREFIX)) as (http, _):
        assert (await http.post("/v1/jobs", json={"prompt": "warm"})).status_code == 202
        await _refuse_writes(redis, refusal, redis_server.data_dir)
        try:
            responses = [await http.post("/v1/jobs", json={"prompt": f"hi {i}"})
                         for i in range(3)]
        finally:
            await _accept_writes(redis, refusal, redis_server.data_dir)
    code = {"oom": "redis_out_of_memory", "misconf": "redis_misconfigured",
            "readonly": "redis_read_only"}[refusal]
    for response in responses:
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["code"] == code and "retry later" in error["message"]
        assert "Traceback" not in response.text
    logged = [r.getMessage() for r in caplog.records if "Retry-After" in r.getMessage()]
    assert len(logged) == 1, logged  # one clear line for three refused requests
    assert len(await _queued(redis)) == 1


async def _refuse_writes(redis: aioredis.Redis, refusal: str, data_dir: Path) -> None:
    if refusal == "oom":
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", "1")  # anything in use is over it
    elif refusal == "misconf":  # a background save failed (disk gone) and writes stop
        await redis.config_set("save", "3600 1")
        await redis.config_set("stop-writes-on-bgsave-error", "yes")
        shutil.rmtree(data_dir)  # BGSAVE cannot create its temporary file
        await redis.bgsave()
        for _ in range(200):
            if (await redis.info("persistence"))["rdb_last_bgsave_status"] == "err":
                return
            await asyncio.sleep(0.02)
        raise AssertionError("BGSAVE did not fail")
    else:  # a replica: what clients see after a failover moved the primary away
        await redis.execute_command("REPLICAOF", "127.0.0.1", "1")


async def _accept_writes(redis: aioredis.Redis, refusal: str, data_dir: Path) -> None:
    if refusal == "oom":
        await redis.config_set("maxmemory", "0")
    elif refusal == "misconf":
        data_dir.mkdir(exist_ok=True)
        await redis.config_set("save", "")
        await redis.config_set("stop-writes-on-bgsave-error", "no")
    else:
        await redis.execute_command("REPLICAOF", "NO", "ONE")
