"""Reading the lanes: priority, exact counts, blocking wait, reclaim bookkeeping."""

from __future__ import annotations

import time

import pytest
import redis

from shared.keys import WORKER_GROUP, Keys
from worker.reader import StreamEntry, StreamReader
from worker.reclaimer import Reclaimer

pytestmark = pytest.mark.integration

KEYS = Keys("tftest")


@pytest.fixture
def reader(client: redis.Redis) -> StreamReader:
    reader = StreamReader(client, KEYS, "m", "c1")
    reader.ensure_groups()
    reader.ensure_groups()  # BUSYGROUP is fine
    return reader


def add(client: redis.Redis, lane: str, n: int) -> None:
    for i in range(n):
        client.xadd(KEYS.requests_stream("m", lane), {"m": f"{lane}-{i}".encode()})


def lanes(entries: list[StreamEntry]) -> list[str]:
    return [e.stream.rsplit(":", 1)[1] for e in entries]


def test_interactive_first_and_never_more_than_asked(
        reader: StreamReader, client: redis.Redis) -> None:
    add(client, "batch", 3)
    add(client, "interactive", 2)
    assert lanes(reader.read(3)) == ["interactive", "interactive", "batch"]
    assert lanes(reader.read(10)) == ["batch", "batch"]
    assert reader.read(10) == []
    assert reader.read(0) == []


def test_batch_lane_moves_under_steady_interactive_load(
        reader: StreamReader, client: redis.Redis) -> None:
    add(client, "interactive", 40)
    add(client, "batch", 1)
    seen = [lane for _ in range(6) for lane in lanes(reader.read(4))]
    assert "batch" in seen


def test_wait_blocks_then_returns_nothing(reader: StreamReader) -> None:
    assert reader.wait(20) == []


def test_wait_returns_new_entry(reader: StreamReader, client: redis.Redis) -> None:
    add(client, "batch", 2)
    [entry] = reader.wait(100)
    assert entry.fields == {b"m": b"batch-0"}


def test_claim_takes_idle_entries_of_others_and_touch_protects_ours(
        reader: StreamReader, client: redis.Redis) -> None:
    add(client, "interactive", 2)
    stream = KEYS.requests_stream("m")
    [ours] = reader.read(1)
    client.xreadgroup(WORKER_GROUP, "ghost", {stream: ">"}, count=1)
    mine = Reclaimer(client, KEYS, reader.streams, "c1", claim_idle_ms=50)
    other = Reclaimer(client, KEYS, reader.streams, "c2", claim_idle_ms=50)
    time.sleep(0.08)
    mine.touch([(ours.stream, ours.entry_id)])
    claimed = other.claim(10)

    assert [e.fields for e in claimed] == [{b"m": b"interactive-1"}]
    assert claimed[0].deliveries == 2
    mine.release([(ours.stream, ours.entry_id)])
    assert [e.entry_id for e in other.claim(10)] == [ours.entry_id]


def test_touch_never_takes_an_entry_back_from_the_worker_that_claimed_it(
        reader: StreamReader, client: redis.Redis) -> None:
    add(client, "interactive", 1)
    [ours] = reader.read(1)
    mine = Reclaimer(client, KEYS, reader.streams, "c1", claim_idle_ms=50)
    other = Reclaimer(client, KEYS, reader.streams, "c2", claim_idle_ms=50)
    time.sleep(0.08)  # we stalled past the claim idle time
    assert [e.entry_id for e in other.claim(10)] == [ours.entry_id]

    lost = mine.touch([(ours.stream, ours.entry_id)])

    assert lost == {(ours.stream, ours.entry_id)}
    [pending] = client.xpending_range(ours.stream, WORKER_GROUP, "-", "+", 10)
    assert pending["consumer"] == b"c2"
    mine.release([(ours.stream, ours.entry_id)])  # nor does the release on exit
    [pending] = client.xpending_range(ours.stream, WORKER_GROUP, "-", "+", 10)
    assert pending["consumer"] == b"c2" and pending["time_since_delivered"] < 50


def lag(client: redis.Redis, stream: str) -> int | None:
    [group] = client.xinfo_groups(stream)
    return group["lag"]


def test_tidy_trims_acknowledged_entries_and_keeps_the_lag_exact(
        reader: StreamReader, client: redis.Redis) -> None:
    add(client, "interactive", 4)
    stream = KEYS.requests_stream("m")
    first, second, third = reader.read(3)
    client.xack(stream, WORKER_GROUP, first.entry_id, third.entry_id)  # out of order
    reclaimer = Reclaimer(client, KEYS, reader.streams, "c1", claim_idle_ms=50)

    reclaimer.tidy()

    assert [entry_id for entry_id, _ in client.xrange(stream)] == [
        second.entry_id, third.entry_id, client.xrange(stream)[-1][0]]  # from the oldest pending
    assert lag(client, stream) == 1  # one entry never delivered
    client.xack(stream, WORKER_GROUP, second.entry_id)
    reclaimer.tidy()
    assert client.xlen(stream) == 1 and lag(client, stream) == 1
    reader.read(1)
    assert lag(client, stream) == 0


def test_tidy_deletes_consumers_without_heartbeat_or_pending_entries(
        reader: StreamReader, client: redis.Redis) -> None:
    add(client, "interactive", 1)
    stream = KEYS.requests_stream("m")
    for name in ("dead-idle", "alive-idle"):
        client.xgroup_createconsumer(stream, WORKER_GROUP, name)
    client.xreadgroup(WORKER_GROUP, "dead-busy", {stream: ">"}, count=1)
    client.set(KEYS.worker("alive-idle"), b"1")

    Reclaimer(client, KEYS, reader.streams, "c1", claim_idle_ms=50).tidy()

    names = {c["name"] for c in client.xinfo_consumers(stream, WORKER_GROUP)}
    assert names == {b"alive-idle", b"dead-busy"}  # dead-busy: its entry must be claimed first
