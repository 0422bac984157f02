"""The step transaction against real Redis: stored once, and fenced by the job's attempt."""

from __future__ import annotations

import copy

import redis

from shared.job_record import BEGIN_ATTEMPT_LUA
from shared.keys import WORKER_GROUP, Keys
from shared.protocol import unpack_event, unpack_events
from worker.engine.types import RequestOutput
from worker.publisher import InFlight, Publisher

KEYS = Keys("tfpub")
STREAM = "tfpub:requests:m:interactive"


def make_publisher(worker_id: str = "w1") -> Publisher:
    return Publisher(KEYS, "m", worker_id, job_ttl_s=60, events_ttl_s=5, stream_maxlen=100)


def begin(client: redis.Redis, job_id: str) -> tuple[int, int, int]:
    attempt, num_events, flag, _ = begin_raw(client, job_id)
    return attempt, num_events, flag


def begin_raw(client: redis.Redis, job_id: str) -> tuple[int, int, int, int]:
    script = client.register_script(BEGIN_ATTEMPT_LUA)
    reply = script(keys=[KEYS.job(job_id), KEYS.job_events(job_id), KEYS.cancel(job_id)],
                   args=[60])
    attempt, num_events, flag, finished = (int(x) for x in reply)
    return attempt, num_events, flag, finished


def stored(client: redis.Redis, job_id: str) -> list[tuple[int, str]]:
    return [(e.seq, e.type) for e in
            (unpack_event(raw) for raw in client.lrange(KEYS.job_events(job_id), 0, -1))]


def test_a_resent_step_transaction_is_stored_once(client: redis.Redis) -> None:
    publisher = make_publisher()
    attempt, _, _ = begin(client, "j")
    job = InFlight(id="j", stream="s", entry_id=b"1-0", reply_channel="",
                   num_prompt_tokens=3, attempt=attempt)
    publisher.start(job)
    publisher.emit(job, RequestOutput(id="j", new_token_ids=[5], text_delta="Hello"))
    first = copy.deepcopy(publisher.outbox)
    publisher.flush(client, [])
    publisher.outbox = first  # the retry of a transaction whose reply was lost
    publisher.flush(client, [])
    assert [seq for seq, _ in stored(client, "j")] == [0, 1]
    assert client.get(KEYS.job_text("j")) == b"Hello"
    publisher.emit(job, RequestOutput(id="j", new_token_ids=[6], text_delta=" world",
                                      finished=True, finish_reason="length",
                                      num_output_tokens=2))
    publisher.flush(client, [])
    assert [seq for seq, _ in stored(client, "j")] == [0, 1, 2, 3]
    assert client.get(KEYS.job_text("j")) == b"Hello world"
    assert client.hget(KEYS.job("j"), "status") == b"succeeded"
    assert 0 < client.ttl(KEYS.job_events("j")) <= 5  # the replay window after finish
    assert client.ttl(KEYS.job_text("j")) > 5


def test_a_fenced_off_attempt_writes_publishes_and_acks_nothing(client: redis.Redis) -> None:
    client.xgroup_create(STREAM, WORKER_GROUP, id="0", mkstream=True)
    entry_id = client.xadd(STREAM, {"m": b"x"})
    client.xreadgroup(WORKER_GROUP, "old", {STREAM: ">"})
    pubsub = client.pubsub()
    pubsub.subscribe("ch")
    pubsub.get_message(timeout=1.0)
    stale, fresh = make_publisher("old"), make_publisher("new")
    old_job = InFlight(id="f", stream=STREAM, entry_id=entry_id, reply_channel="ch",
                       num_prompt_tokens=3, attempt=begin(client, "f")[0])
    stale.start(old_job)
    stale.flush(client, [])
    new_attempt, num_events, _ = begin(client, "f")  # another worker took the delivery
    new_job = InFlight(id="f", stream=STREAM, entry_id=entry_id, reply_channel="ch",
                       num_prompt_tokens=3, attempt=new_attempt, next_seq=num_events)
    fresh.start(new_job, is_restart=True)
    fresh.flush(client, [])

    stale.emit(old_job, RequestOutput("f", [5], " stale", finished=True,
                                      finish_reason="length", num_output_tokens=1))
    result = stale.flush(client, [])

    assert result.lost == {("f", 1)}
    assert stored(client, "f") == [(0, "start"), (1, "restart"), (2, "start")]
    assert not client.exists(KEYS.job_text("f")) or client.get(KEYS.job_text("f")) == b""
    record = client.hgetall(KEYS.job("f"))
    assert (record[b"status"], record[b"worker"], record[b"attempt"]) == (
        b"running", b"new", b"2")
    assert client.xpending(STREAM, WORKER_GROUP)["pending"] == 1  # not acked by the stale one
    heard = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        heard.extend((e.seq, e.type) for e in unpack_events(message["data"]))
    assert heard == [(0, "start"), (1, "restart"), (2, "start")]
    pubsub.close()


def test_a_finished_job_gets_no_new_attempt(client: redis.Redis) -> None:
    """Found by the chaos soak: worker A finishes a job (and acks its entry) just after
    worker B claimed that entry; B then begins it. A new attempt would set the job back to
    ``running`` with nobody left to finish it (the entry is acked): B must see it is done."""
    publisher = make_publisher("a")
    attempt, _, _ = begin(client, "done")
    job = InFlight(id="done", stream="s", entry_id=b"1-0", reply_channel="",
                   num_prompt_tokens=3, attempt=attempt)
    publisher.start(job)
    publisher.finish(job, "length", num_output_tokens=2)
    publisher.flush(client, [])
    assert client.hget(KEYS.job("done"), "status") == b"succeeded"
    assert begin_raw(client, "done") == (0, 0, 0, 1)  # B: finished, nothing to run
    assert client.hget(KEYS.job("done"), "status") == b"succeeded"
    assert client.hget(KEYS.job("done"), "attempt") == str(attempt).encode()


def test_the_step_transaction_is_one_round_trip_and_survives_a_script_flush(
        client: redis.Redis) -> None:
    """The scripts go as EVAL inside the MULTI: no SCRIPT EXISTS round trip before it
    (redis-py's registered scripts ask on every execute), and a Redis that lost its script
    cache (restart, SCRIPT FLUSH) still runs the whole transaction, never half of it."""
    client.xgroup_create(STREAM, WORKER_GROUP, id="0", mkstream=True)
    entry_id = client.xadd(STREAM, {"m": b"x"})
    client.xreadgroup(WORKER_GROUP, "w1", {STREAM: ">"})
    publisher = make_publisher()
    job = InFlight(id="r", stream=STREAM, entry_id=entry_id, reply_channel="ch",
                   num_prompt_tokens=3, attempt=begin(client, "r")[0])
    publisher.start(job)
    publisher.emit(job, RequestOutput(id="r", new_token_ids=[5], text_delta="Hi"))
    client.script_flush()
    before = client.info("commandstats")
    publisher.flush(client, [])
    after = client.info("commandstats")
    assert "cmdstat_script|exists" not in after
    calls = {name: after[name]["calls"] - before.get(name, {}).get("calls", 0)
             for name in after}
    assert calls["cmdstat_exec"] == 1
    assert calls["cmdstat_eval"] == 2  # the job write and the channel's publish
    assert calls.get("cmdstat_evalsha", 0) == 0
    assert client.get(KEYS.job_text("r")) == b"Hi"
    publisher.emit(job, RequestOutput(id="r", new_token_ids=[6], text_delta="!",
                                      finished=True, finish_reason="stop",
                                      num_output_tokens=2))
    client.script_flush()
    publisher.flush(client, [])
    assert client.hget(KEYS.job("r"), "status") == b"succeeded"
    assert client.xpending(STREAM, WORKER_GROUP)["pending"] == 0  # acknowledged with it
