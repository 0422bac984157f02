"""Production hardening of the worker loop (issue 7), with the real loop and the null engine:
first-token time, fenced deliveries, compaction to a small footprint, Redis refusing writes,
KV budget and use."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from gateway.jobs import job_view
from gateway.submit import Submission
from shared.keys import WORKER_GROUP
from shared.model_info import ModelInfo
from tests.integration.worker_harness import (
    KEYS,
    MODEL,
    Listener,
    WorkerFactory,
    job,
    make_request,
    num_pending,
    stored_events,
    submit,
    wait_finished,
    wait_for,
)
from worker.engine.types import RequestOutput
from worker.null_engine import NullEngine, word_token
from worker.service import WorkerService

pytestmark = pytest.mark.integration


@pytest.fixture
def factory(redis_url: str) -> Iterator[WorkerFactory]:
    workers = WorkerFactory(redis_url)
    yield workers
    workers.stop_all()


@pytest.fixture
def listener(client: redis.Redis) -> Iterator[Listener]:
    sub = Listener(client)
    sub.pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    yield sub
    sub.pubsub.close()


def enqueue_like_the_gateway(client: redis.Redis, job_id: str, max_tokens: int) -> None:
    """The job hash the gateway writes (its own ``job_fields``), then the stream entry."""
    request = make_request(job_id, max_tokens=max_tokens)
    fields = Submission(request, kind="chat", stream=True, include_usage=False).job_fields("gw")
    client.hset(KEYS.job(job_id), mapping=fields)  # type: ignore[arg-type]
    client.expire(KEYS.job(job_id), 86_400)
    submit(client, request)


def full_text(num_tokens: int) -> str:
    return "".join(word_token(i)[1] for i in range(num_tokens))


# --- first-token time ----------------------------------------------------------------------------


def test_job_view_shows_the_time_to_first_token(
        factory: WorkerFactory, client: redis.Redis) -> None:
    factory.start(step_delay_s=0.01)
    enqueue_like_the_gateway(client, "job-ttft", max_tokens=5)
    wait_finished(client, "job-ttft")

    view = job_view("job-ttft", client.hgetall(KEYS.job("job-ttft")),
                    client.get(KEYS.job_text("job-ttft")).decode())

    timings = view["timings"]
    assert timings["ttft_s"] is not None
    assert timings["queue_s"] <= timings["ttft_s"] <= timings["total_s"]
    assert view["started_at"] <= float(job(client, "job-ttft")["first_token_at"])
    assert (view["status"], view["completion_tokens"], view["text"]) == (
        "succeeded", 5, full_text(5))


# --- fenced deliveries ---------------------------------------------------------------------------


class Pause:
    """Stops a worker on request (between polls or inside a step) until resumed."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.reached = threading.Event()
        self.released = threading.Event()

    def point(self) -> None:
        if self.requested.is_set() and not self.released.is_set():
            self.reached.set()
            self.released.wait(30)


PAUSE = Pause()  # one paused worker per test; reset by the test


class PausedBetweenPolls(WorkerService):
    def poll_once(self) -> None:
        PAUSE.point()  # the loop stops calling its poll
        super().poll_once()


class PausedInStep(NullEngine):
    def step(self) -> list[RequestOutput]:
        PAUSE.point()  # a step that stalls longer than the claim idle time
        return super().step()


@pytest.mark.parametrize("where", ["between polls", "inside a step"])
def test_a_stalled_worker_that_lost_its_request_writes_nothing_more(
        factory: WorkerFactory, client: redis.Redis, listener: Listener, where: str) -> None:
    global PAUSE
    PAUSE = Pause()
    pausable: dict[str, object] = ({"service_class": PausedBetweenPolls}
                                   if where == "between polls"
                                   else {"engine_class": PausedInStep})
    num_tokens = 120
    settings = {"claim_idle_ms": 600, "null_engine_tokens": num_tokens}
    stale = factory.start(step_delay_s=0.01, **pausable, **settings)  # type: ignore[arg-type]
    submit(client, make_request("job-fence", max_tokens=num_tokens))
    events_key = KEYS.job_events("job-fence")
    wait_for(lambda: client.llen(events_key) >= 5)
    stale.service.toucher.stop()  # the whole process stalls (GC pause, SIGSTOP, swap...)
    PAUSE.requested.set()
    wait_for(lambda: PAUSE.reached.is_set())
    num_stale_events = client.llen(events_key)

    fresh = factory.start(step_delay_s=0.01, **settings)  # type: ignore[arg-type]
    wait_for(lambda: job(client, "job-fence").get("worker") == fresh.worker_id)
    wait_for(lambda: client.llen(events_key) >= num_stale_events + 12)  # both would run now
    PAUSE.released.set()

    result = wait_finished(client, "job-fence")
    wait_for(lambda: not stale.service.jobs and not stale.engine.has_unfinished())
    wait_for(lambda: not stale.service.lost)
    listener.collect(num_terminal=1)

    events = stored_events(client, "job-fence")
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.type for e in events[num_stale_events:]] == [
        "restart", "start", *["token"] * num_tokens, "done"]
    assert client.get(KEYS.job_text("job-fence")).decode() == full_text(num_tokens)
    assert (result["status"], result["completion_tokens"], result["worker"],
            result["attempt"]) == ("succeeded", str(num_tokens), fresh.worker_id, "2")
    heard = [e for e in listener.events if e.id == "job-fence"]
    assert [e.seq for e in heard] == list(range(len(heard)))  # no stale seq heard again
    assert heard == events
    assert num_pending(client) == 0
    assert stale.thread.is_alive()


# --- memory: compaction, trimming ----------------------------------------------------------------


def job_footprint(client: redis.Redis, job_id: str) -> int:
    keys = (KEYS.job(job_id), KEYS.job_text(job_id), KEYS.job_events(job_id),
            KEYS.cancel(job_id))
    return sum(client.memory_usage(key) or 0 for key in keys)


def test_a_finished_chat_is_compacted_to_its_text_plus_a_kilobyte(
        factory: WorkerFactory, client: redis.Redis) -> None:
    factory.start(events_ttl_s=1, claim_idle_ms=300, null_engine_tokens=256)
    stream = KEYS.requests_stream(MODEL)
    enqueue_like_the_gateway(client, "job-warm", max_tokens=1)  # creates the worker's consumer
    wait_finished(client, "job-warm")
    wait_for(lambda: client.xlen(stream) == 0)
    stream_before = client.memory_usage(stream) or 0  # the stream's fixed cost, not the job's
    enqueue_like_the_gateway(client, "job-mem", max_tokens=256)

    result = wait_finished(client, "job-mem")
    assert result["completion_tokens"] == "256"
    wait_for(lambda: client.xlen(stream) == 0)  # acknowledged entries are trimmed
    wait_for(lambda: not client.exists(KEYS.job_events("job-mem")), timeout_s=5)  # window over

    text = client.get(KEYS.job_text("job-mem"))
    assert text == full_text(256).encode()
    stream_growth = (client.memory_usage(stream) or 0) - stream_before
    assert job_footprint(client, "job-mem") + stream_growth <= len(text) + 1024
    record = job(client, "job-mem")  # what a compacted replay needs
    assert (record["status"], record["finish_reason"], record["prompt_tokens"]) == (
        "succeeded", "length", "3")
    assert client.ttl(KEYS.job("job-mem")) > 3600 and client.ttl(KEYS.job_text("job-mem")) > 3600


def test_dead_consumers_leave_the_group(
        factory: WorkerFactory, client: redis.Redis) -> None:
    stream = KEYS.requests_stream(MODEL)
    client.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    submit(client, make_request("job-orphan"))
    client.xreadgroup(WORKER_GROUP, "dead-worker", {stream: ">"}, count=1)

    worker = factory.start(claim_idle_ms=300)

    assert wait_finished(client, "job-orphan")["status"] == "succeeded"
    wait_for(lambda: [c["name"] for c in client.xinfo_consumers(stream, WORKER_GROUP)] == [
        worker.worker_id.encode()])


# --- Redis refusing writes -----------------------------------------------------------------------


def test_worker_backs_off_while_redis_is_out_of_memory_and_then_finishes(
        factory: WorkerFactory, client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.service")
    worker = factory.start(step_delay_s=0.01, null_engine_tokens=100)
    submit(client, make_request("job-oom", max_tokens=100))
    wait_for(lambda: client.strlen(KEYS.job_text("job-oom")) > 0)

    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")
    client.config_set("maxmemory", "1")  # below what Redis already uses: every write refused
    try:
        wait_for(lambda: len(retries(caplog, "still")) >= 3)
        assert job(client, "job-oom")["status"] == "running"
    finally:
        client.config_set("maxmemory", "0")

    result = wait_finished(client, "job-oom")
    assert (result["status"], result["completion_tokens"]) == ("succeeded", "100")
    events = stored_events(client, "job-oom")
    assert [e.seq for e in events] == list(range(102))
    assert client.get(KEYS.job_text("job-oom")).decode() == full_text(100)
    warnings = [r for r in retries(caplog, "out of memory") if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line, not one per retry
    assert "Command #" not in warnings[0].getMessage()
    assert len(retries(caplog, "serving us again")) == 1
    assert worker.thread.is_alive()


def retries(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "worker.service" and text in r.getMessage()]


# --- budgets and KV use --------------------------------------------------------------------------


def test_model_info_has_the_kv_budget_and_the_heartbeat_reports_kv_use(
        factory: WorkerFactory, client: redis.Redis) -> None:
    worker = factory.start(step_delay_s=0.02, null_engine_tokens=200, max_batch_tokens=4096)
    info = ModelInfo.from_mapping(client.hgetall(KEYS.model_info(MODEL)))
    assert info.max_batch_tokens == 4096
    submit(client, make_request("job-kv", max_tokens=200))
    key = KEYS.worker(worker.worker_id)

    wait_for(lambda: int(client.hget(key, "kv_tokens_used") or 0) > 3)

    assert client.hget(key, "kv_tokens_budget") == b"4096"
    wait_finished(client, "job-kv")
    wait_for(lambda: client.hget(key, "kv_tokens_used") == b"0")


def test_a_step_longer_than_the_claim_idle_time_keeps_its_request(
        factory: WorkerFactory, client: redis.Redis) -> None:
    global PAUSE
    PAUSE = Pause()
    settings = {"claim_idle_ms": 400, "null_engine_tokens": 20}
    busy = factory.start(step_delay_s=0.01, engine_class=PausedInStep,  # type: ignore[arg-type]
                         **settings)
    submit(client, make_request("job-long-step", max_tokens=20))
    wait_for(lambda: client.llen(KEYS.job_events("job-long-step")) >= 3)
    PAUSE.requested.set()
    wait_for(lambda: PAUSE.reached.is_set())
    factory.start(**settings)  # would claim an entry idle for 400 ms
    stream = KEYS.requests_stream(MODEL)
    try:
        held_until = time.monotonic() + 1.5
        while time.monotonic() < held_until:  # the step stalls for > 3 claim idle times
            [entry] = client.xpending_range(stream, WORKER_GROUP, "-", "+", 10)
            assert entry["consumer"] == busy.worker_id.encode()
            time.sleep(0.05)
    finally:
        PAUSE.released.set()
    result = wait_finished(client, "job-long-step")
    assert (result["worker"], result["attempt"], result["completion_tokens"]) == (
        busy.worker_id, "1", "20")
