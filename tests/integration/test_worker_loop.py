"""The queue loop against a real redis-server, with the null engine, in a thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import redis

from shared.keys import WORKER_GROUP
from shared.protocol import TokenEvent, pack
from tests.conftest import RedisServer
from tests.integration.worker_harness import (
    CHANNEL,
    KEYS,
    MODEL,
    Listener,
    RunningWorker,
    WorkerFactory,
    make_request,
    num_pending,
    stored_events,
    submit,
    wait_finished,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def start_worker(redis_url: str) -> Iterator[Callable[..., RunningWorker]]:
    factory = WorkerFactory(redis_url)
    yield factory.start
    factory.stop_all()


@pytest.fixture
def listener(client: redis.Redis) -> Iterator[Listener]:
    sub = Listener(client)
    sub.pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    yield sub
    sub.pubsub.close()


# --- the happy path ---------------------------------------------------------------------------


def test_request_streams_events_stores_result_and_acks(
        start_worker: Callable[..., RunningWorker], client: redis.Redis,
        listener: Listener) -> None:
    worker = start_worker()
    submit(client, make_request("job-1", max_tokens=5))

    events = listener.collect(num_terminal=1)

    assert [e.type for e in events] == ["start", *["token"] * 5, "done"]
    assert [e.seq for e in events] == list(range(7))
    done = events[-1]
    assert (done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("length", 3, 5)
    result = wait_finished(client, "job-1")
    assert result["status"] == "succeeded"
    assert result["completion_tokens"] == "5"
    assert result["prompt_tokens"] == "3"
    assert result["worker"] == worker.worker_id
    assert client.get(KEYS.job_text("job-1")) == b" lorem ipsum dolor sit amet"
    assert stored_events(client, "job-1") == events
    assert num_pending(client) == 0
    for key in (KEYS.job("job-1"), KEYS.job_text("job-1"), KEYS.job_events("job-1")):
        assert client.ttl(key) > 0


def test_max_tokens_above_null_engine_tokens_is_capped(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    start_worker(null_engine_tokens=3)
    submit(client, make_request("job-cap", max_tokens=100))
    assert wait_finished(client, "job-cap")["completion_tokens"] == "3"


def test_requests_in_one_coalescing_window_start_together(
        start_worker: Callable[..., RunningWorker], client: redis.Redis,
        listener: Listener) -> None:
    worker = start_worker(coalesce_ms=400.0)
    ids = [f"co-{i}" for i in range(5)]
    for job_id in ids:
        submit(client, make_request(job_id))
        time.sleep(0.02)

    listener.collect(num_terminal=len(ids))

    assert worker.engine.admissions[0] == ids


def test_full_batch_ends_the_coalescing_window_early(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    worker = start_worker(coalesce_ms=5000.0, max_batch_size=3)
    started = time.monotonic()
    for i in range(3):
        submit(client, make_request(f"full-{i}"))
    for i in range(3):
        wait_finished(client, f"full-{i}")
    assert time.monotonic() - started < 3.0
    assert sorted(worker.engine.admissions[0]) == ["full-0", "full-1", "full-2"]


def test_an_idle_worker_releases_the_engines_kept_memory(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    worker = start_worker(0.3)  # a step takes 0.3 s: 1.2 s busy for 4 tokens
    submit(client, make_request("idle-1", max_tokens=4))
    wait_for(lambda: worker.engine.has_unfinished())
    busy_from = worker.engine.idle_releases
    time.sleep(0.6)
    assert worker.engine.has_unfinished() and worker.engine.idle_releases == busy_from
    wait_finished(client, "idle-1")
    wait_for(lambda: worker.engine.idle_releases >= busy_from + 2)  # each empty idle read


# --- entries that are not served --------------------------------------------------------------


def test_malformed_entries_are_dead_lettered_and_the_worker_keeps_serving(
        start_worker: Callable[..., RunningWorker], client: redis.Redis,
        listener: Listener) -> None:
    start_worker()
    stream = KEYS.requests_stream(MODEL)
    client.xadd(stream, {"m": b"garbage"})
    client.xadd(stream, {"x": b"no m here"})
    half = msgpack.packb({"v": 1, "id": "job-half", "reply_channel": CHANNEL})
    client.xadd(stream, {"m": half})
    submit(client, make_request("job-ok"))

    events = listener.collect(num_terminal=2)

    assert wait_finished(client, "job-ok")["status"] == "succeeded"
    half_job = wait_finished(client, "job-half")
    assert half_job["status"] == "failed"
    assert "malformed request" in half_job["error"]
    assert [e.type for e in events if e.id == "job-half"] == ["error"]
    dead = client.xrange(KEYS.dead_letter_stream(MODEL))
    assert [fields.get(b"m") for _, fields in dead] == [b"garbage", None, half]
    assert all(fields[b"reason"] for _, fields in dead)
    assert dead[1][1][b"x"] == b"no m here"
    assert num_pending(client) == 0


def test_request_cancelled_before_start_is_skipped(
        start_worker: Callable[..., RunningWorker], client: redis.Redis,
        listener: Listener) -> None:
    worker = start_worker()
    client.set(KEYS.cancel("job-c"), b"1")
    submit(client, make_request("job-c"))

    events = listener.collect(num_terminal=1)

    assert [(e.type, e.finish_reason) for e in events] == [("done", "cancelled")]
    assert wait_finished(client, "job-c")["status"] == "cancelled"
    assert not any("job-c" in batch for batch in worker.engine.admissions)
    assert num_pending(client) == 0


def test_running_request_is_aborted_when_its_cancel_key_appears(
        start_worker: Callable[..., RunningWorker], client: redis.Redis,
        listener: Listener) -> None:
    start_worker(step_delay_s=0.01, null_engine_tokens=10_000)
    submit(client, make_request("job-run", max_tokens=10_000))
    wait_for(lambda: client.strlen(KEYS.job_text("job-run")) > 0)

    client.set(KEYS.cancel("job-run"), b"1")

    events = listener.collect(num_terminal=1)
    assert events[-1].finish_reason == "cancelled"
    result = wait_finished(client, "job-run")
    assert result["status"] == "cancelled"
    assert 0 < int(result["completion_tokens"]) < 10_000
    assert num_pending(client) == 0


def test_request_past_its_deadline_fails_unserved(
        start_worker: Callable[..., RunningWorker], client: redis.Redis,
        listener: Listener) -> None:
    start_worker()
    submit(client, make_request("job-late", deadline=time.time() - 1.0))

    events = listener.collect(num_terminal=1)

    assert [(e.type, e.finish_reason, e.error) for e in events] == [
        ("error", "timeout", "timed out in queue")]
    result = wait_finished(client, "job-late")
    assert (result["status"], result["error"], result["finish_reason"]) == (
        "failed", "timed out in queue", "timeout")
    assert num_pending(client) == 0


# --- several workers, lanes, liveness ---------------------------------------------------------


def test_two_workers_in_one_group_both_take_work(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    first = start_worker(step_delay_s=0.01, max_batch_size=2, coalesce_ms=0.0)
    second = start_worker(step_delay_s=0.01, max_batch_size=2, coalesce_ms=0.0)
    ids = [f"share-{i}" for i in range(8)]
    for job_id in ids:
        submit(client, make_request(job_id, max_tokens=10))

    workers = {wait_finished(client, job_id)["worker"] for job_id in ids}

    assert workers == {first.worker_id, second.worker_id}
    assert num_pending(client) == 0


def test_batch_lane_is_served(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    start_worker()
    submit(client, make_request("job-batch", lane="batch"), lane="batch")
    assert wait_finished(client, "job-batch")["status"] == "succeeded"
    assert num_pending(client, "batch") == 0


def test_heartbeat_hash_and_fleet_set(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    worker = start_worker()
    key = KEYS.worker(worker.worker_id)
    wait_for(lambda: client.hget(key, "state") == b"ready")

    beat = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
    assert beat["id"] == worker.worker_id
    assert beat["model"] == MODEL
    assert beat["warm"] == "1"
    assert {"quantization", "dtype", "batch_size", "waiting", "started_at"} <= beat.keys()
    assert 0 < client.ttl(key) <= 10
    assert client.zscore(KEYS.workers, worker.worker_id) is not None
    assert client.hexists(KEYS.model_info(MODEL), "tokenizer_json")

    worker.stop()
    assert not client.exists(key)
    assert client.zscore(KEYS.workers, worker.worker_id) is None


def test_stale_workers_are_pruned_from_the_fleet_set(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    client.zadd(KEYS.workers, {"ghost": time.time() - 3600})
    start_worker()
    wait_for(lambda: client.zscore(KEYS.workers, "ghost") is None)


# --- failures ---------------------------------------------------------------------------------


def test_stalled_request_of_a_dead_worker_is_reclaimed_and_restarted(
        start_worker: Callable[..., RunningWorker], client: redis.Redis,
        listener: Listener) -> None:
    stream = KEYS.requests_stream(MODEL)
    client.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    submit(client, make_request("job-orphan"))
    client.xreadgroup(WORKER_GROUP, "dead-worker", {stream: ">"}, count=1)
    client.rpush(KEYS.job_events("job-orphan"), pack(TokenEvent("job-orphan", 0, "start")))

    start_worker(claim_idle_ms=200)

    events = listener.collect(num_terminal=1)
    assert [e.type for e in events][:2] == ["restart", "start"]
    assert events[0].seq == 1  # continues after the dead worker's event
    assert wait_finished(client, "job-orphan")["status"] == "succeeded"
    assert num_pending(client) == 0


def test_request_delivered_too_often_is_dead_lettered(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    stream = KEYS.requests_stream(MODEL)
    client.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    entry_id = submit(client, make_request("job-poison"))
    client.xreadgroup(WORKER_GROUP, "dead-worker", {stream: ">"}, count=1)
    client.xclaim(stream, WORKER_GROUP, "dead-worker", 0, [entry_id], retrycount=3)

    start_worker(claim_idle_ms=200, max_deliveries=3)

    result = wait_finished(client, "job-poison")
    assert result["status"] == "failed"
    assert "delivered 4 times" in result["error"]
    dead = client.xrange(KEYS.dead_letter_stream(MODEL))
    assert [fields[b"source_id"] for _, fields in dead] == [entry_id]
    assert num_pending(client) == 0


def test_worker_rides_out_a_redis_restart(
        start_worker: Callable[..., RunningWorker], redis_server: RedisServer,
        client: redis.Redis) -> None:
    worker = start_worker()
    submit(client, make_request("before"))
    wait_finished(client, "before")

    redis_server.restart()
    submit(client, make_request("after"))

    assert wait_finished(client, "after")["status"] == "succeeded"
    assert worker.thread.is_alive()


def test_in_flight_request_survives_a_redis_outage(
        start_worker: Callable[..., RunningWorker], redis_server: RedisServer,
        client: redis.Redis) -> None:
    start_worker(step_delay_s=0.01, null_engine_tokens=100)
    submit(client, make_request("job-outage", max_tokens=100))
    wait_for(lambda: client.strlen(KEYS.job_text("job-outage")) > 0)

    redis_server.stop()
    time.sleep(0.5)
    redis_server.start()

    result = wait_finished(client, "job-outage")
    assert (result["status"], result["completion_tokens"]) == ("succeeded", "100")
    events = stored_events(client, "job-outage")
    assert [e.seq for e in events] == list(range(102))
    text = client.get(KEYS.job_text("job-outage")).decode()
    assert text == "".join(e.text for e in events)
    assert len(text.split()) == 100
    assert num_pending(client) == 0


def test_worker_recreates_its_groups_after_redis_loses_its_data(
        start_worker: Callable[..., RunningWorker], client: redis.Redis) -> None:
    worker = start_worker()
    time.sleep(0.05)  # let the worker block in its idle read
    client.flushall()

    submit(client, make_request("after-flush"))

    assert wait_finished(client, "after-flush")["status"] == "succeeded"
    assert client.hexists(KEYS.model_info(MODEL), "tokenizer_json")
    assert worker.thread.is_alive()
