"""Issue 17: queue position, ETA and Retry-After of queued jobs; ``event: queued``; the cost
of a poll does not grow with the queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.keys import WORKER_GROUP, Keys
from shared.settings import Settings
from tests.integration.test_gateway_streams import served
from tests.support.gateway import gateway_client, parse_sse
from tests.support.model import tiny_model_info
from tests.support.worker import register_worker, running_worker

PREFIX = "tftest"
KEYS = Keys(PREFIX)
MODEL = "tiny"


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, default_max_tokens=16,
                    backlog_limit=0, stream_maxlen=1_000_000)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    register_worker(settings, tiny_model_info())  # served; nothing reads the queue yet
    async with gateway_client(settings) as (http, _):
        yield http


async def submit(client: httpx.AsyncClient, lane: str = "interactive") -> dict[str, Any]:
    response = await client.post("/v1/jobs", json={"model": MODEL, "prompt": "hi",
                                                   "lane": lane})
    assert response.status_code == 202, response.text
    return response.json()


async def position(client: httpx.AsyncClient, job_id: str) -> int:
    body = (await client.get(f"/v1/jobs/{job_id}")).json()
    return int(body["queue_position"])


async def read_as_a_worker(redis: aioredis.Redis, lane: str, count: int) -> None:
    """What a worker's read does to the group: deliver ``count`` entries of ``lane``."""
    stream = KEYS.requests_stream(MODEL, lane)
    await redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    await redis.xreadgroup(WORKER_GROUP, "worker-test", {stream: ">"}, count=count)


async def test_positions_are_exact_and_batch_waits_behind_interactive(
        client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    interactive = [await submit(client) for _ in range(5)]
    batch = [await submit(client, "batch") for _ in range(3)]
    assert interactive[0]["queue_position"] == 0  # also on the 202
    assert [await position(client, j["id"]) for j in interactive] == [0, 1, 2, 3, 4]
    assert [await position(client, j["id"]) for j in batch] == [5, 6, 7]

    await read_as_a_worker(redis, "interactive", 2)  # two requests went to a worker
    assert [await position(client, j["id"]) for j in interactive] == [0, 0, 0, 1, 2]
    assert [await position(client, j["id"]) for j in batch] == [3, 4, 5]
    await read_as_a_worker(redis, "batch", 1)
    await submit(client)  # a later interactive request goes ahead of waiting batch work
    assert [await position(client, j["id"]) for j in batch] == [0, 4, 5]


async def test_a_queued_job_says_when_to_poll_and_when_it_should_start(
        client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    jobs = [await submit(client) for _ in range(4)]
    response = await client.get(f"/v1/jobs/{jobs[3]['id']}")
    assert response.json()["estimated_start_s"] is None  # no throughput measured yet
    assert response.headers["retry-after"] == "2"
    # The fleet's dequeue rate: 5/s so far; the last sample was 2 s ago, 20 reads ago.
    await read_as_a_worker(redis, "interactive", 1)
    seconds, micros = await redis.time()
    await redis.hset(KEYS.queue_rate(MODEL), mapping={
        "t": repr(seconds + micros / 1e6 - 2.0), "n": -19, "rate": "5.0"})
    body = (await client.get(f"/v1/jobs/{jobs[3]['id']}")).json()
    assert body["queue_position"] == 2
    rate = float(await redis.hget(KEYS.queue_rate(MODEL), "rate"))
    assert 5.25 < rate < 5.4  # 10/s over the last 2 s moves 5/s by 1 - exp(-2/30) of the gap
    assert body["estimated_start_s"] == round(3 / rate, 1)
    response = await client.get(f"/v1/jobs/{jobs[3]['id']}")
    assert response.headers["retry-after"] == "1"


async def test_finished_and_running_jobs_have_no_position(settings: Settings,
                                                          client: httpx.AsyncClient) -> None:
    async with running_worker(settings, tiny_model_info()):
        job = await submit(client)
        for _ in range(500):
            response = await client.get(f"/v1/jobs/{job['id']}")
            if response.json()["status"] == "succeeded":
                break
            await asyncio.sleep(0.01)
    body = response.json()
    assert body["status"] == "succeeded"
    assert body["queue_position"] is None and body["estimated_start_s"] is None
    assert "retry-after" not in response.headers


async def test_the_job_stream_tells_a_waiting_reader_its_position(
        settings: Settings, client: httpx.AsyncClient) -> None:
    first, second = await submit(client), await submit(client)
    async with served(settings) as (http, _):  # a real server: the stream arrives as sent
        text = ""
        async with http.stream("GET", f"/v1/jobs/{second['id']}/stream") as response:
            async for chunk in response.aiter_text():
                text += chunk
                if "event: queued" in text and text.endswith("\n\n"):
                    break
        queued = [data for name, data in parse_sse(text) if name == "queued"]
        assert queued == ['{"queue_position":1,"estimated_start_s":null}']
        block = text[text.index("event: queued"):].split("\n\n")[0]
        assert "id:" not in block  # a reconnect resumes after the last token, not this

        async with running_worker(settings, tiny_model_info()):
            response = await http.get(f"/v1/jobs/{first['id']}/stream")
    events = parse_sse(response.text)
    assert events[-1] == (None, "[DONE]")
    assert "Hello" in response.text


async def test_a_poll_costs_the_same_at_100000_queued_as_at_10(
        client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    """Redis commands (and their server time) of one poll of the last queued job."""
    small = await poll_cost(client, redis, 10)
    await redis.delete(KEYS.requests_stream(MODEL, "interactive"),
                       KEYS.queue_added(MODEL, "interactive"), KEYS.queue_rate(MODEL))
    large = await poll_cost(client, redis, 100_000)
    assert large["position"] == 100_000 - 1 and small["position"] == 10 - 1
    assert large["calls"] == small["calls"]  # the same commands, none of them a scan
    print(f"\npoll cost: 10 queued {small}, 100000 queued {large}")
    assert large["usec_per_poll"] < max(10 * small["usec_per_poll"], 500)


async def poll_cost(client: httpx.AsyncClient, redis: aioredis.Redis,
                    num_queued: int) -> dict[str, Any]:
    """Fill the interactive lane with ``num_queued`` entries (the last a real job), then
    measure ``INFO commandstats`` deltas over polls of that job."""
    filler = num_queued - 1
    script = redis.register_script("""
for i = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], '*', 'm', 'x') end
return 1""")
    stream = KEYS.requests_stream(MODEL, "interactive")
    await redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)  # a worker's start
    for done in range(0, filler, 10_000):
        await script(keys=[stream], args=[min(10_000, filler - done)])
    job = await submit(client)
    await position(client, job["id"])  # warm: scripts loaded
    polls = 20
    before = await redis.info("commandstats")
    started = time.perf_counter()
    for _ in range(polls):
        found = await position(client, job["id"])
    elapsed = time.perf_counter() - started
    after = await redis.info("commandstats")
    calls = {name: after[name]["calls"] - before.get(name, {}).get("calls", 0)
             for name in after if after[name]["calls"] != before.get(name, {}).get("calls")}
    calls.pop("cmdstat_info", None)
    usec = {name: after[name]["usec"] - before.get(name, {}).get("usec", 0) for name in calls}
    return {"position": found,
            "calls": {k.removeprefix("cmdstat_"): v / polls for k, v in sorted(calls.items())},
            "usec": {k.removeprefix("cmdstat_"): round(v / polls, 1)
                     for k, v in sorted(usec.items())},
            "usec_per_poll": round(sum(usec.values()) / polls, 1),
            "ms_per_poll_http": round(elapsed / polls * 1000, 2)}
