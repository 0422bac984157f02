"""Decoding delivered entries, salvaging ids from broken ones, loop helpers."""

from __future__ import annotations

import msgpack
import pytest

from shared.protocol import GenerateRequest, SamplingParams, pack
from worker.engine.types import EngineStats
from worker.heartbeat import WorkerStatus
from worker.intake import decode_entry, effective_deadline, salvage_job
from worker.reader import LanePlanner, StreamEntry
from worker.service import Backoff, maintenance_interval_s


def entry(fields: dict[bytes, bytes], stream: str = "s") -> StreamEntry:
    return StreamEntry(stream=stream, entry_id=b"1-0", fields=fields)


def request(**kwargs: object) -> GenerateRequest:
    return GenerateRequest(id="r", model="m", prompt_token_ids=[1], params=SamplingParams(),
                           **kwargs)  # type: ignore[arg-type]


def test_decode_good_entry() -> None:
    decoded = decode_entry(entry({b"m": pack(request())}))
    assert decoded.problem is None
    assert decoded.request == request()


def test_decode_problems_never_raise() -> None:
    assert decode_entry(entry({b"x": b"1"})).problem == "entry has no 'm' field"
    assert "msgpack" in (decode_entry(entry({b"m": b"\xc1"})).problem or "")
    assert decode_entry(entry({b"m": msgpack.packb({"v": 99})})).problem


def test_salvage_job_id_and_channel() -> None:
    half = msgpack.packb({"id": "j1", "reply_channel": "ch"})
    assert salvage_job({b"m": half}) == ("j1", "ch")
    assert salvage_job({b"m": msgpack.packb({"id": "j2", "reply_channel": 5})}) == ("j2", "")
    assert salvage_job({b"m": b"garbage\xc1"}) is None
    assert salvage_job({b"m": msgpack.packb([1, 2])}) is None
    assert salvage_job({}) is None


def test_effective_deadline() -> None:
    assert effective_deadline(request(deadline=5.0), 100.0) == 5.0
    assert effective_deadline(request(created_at=10.0), 100.0) == 110.0
    assert effective_deadline(request(created_at=10.0), None) is None
    assert effective_deadline(request(), 100.0) is None


def test_lane_planner_gives_the_batch_lane_a_share_after_starved_reads() -> None:
    planner = LanePlanner(["hi", "lo"])
    full = [StreamEntry("hi", b"1-0", {})] * 8
    for _ in range(4):
        plan = planner.plan(8)
        assert plan == [("hi", 8), ("lo", 8)]
        planner.record(plan, 8, full)
    plan = planner.plan(8)
    assert plan == [("lo", 2), ("hi", 8)]
    planner.record(plan, 8, full)
    assert planner.plan(8) == [("hi", 8), ("lo", 8)]


def test_lane_planner_keeps_the_reserve_for_the_first_lane() -> None:
    planner = LanePlanner(["hi", "lo"], reserve=4)
    assert planner.plan(10) == [("hi", 10), ("lo", 6)]
    assert planner.plan(3) == [("hi", 3), ("lo", 0)]  # a worker full of batch work


def test_lane_priorities_put_interactive_first() -> None:
    from shared.keys import LANES, lane_priority

    assert [lane_priority(lane) for lane in LANES] == [0, 1]
    assert lane_priority("unknown") == len(LANES)


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay_s() for _ in range(8)]
    assert delays[:3] == [0.05, 0.1, 0.2]
    assert delays[-1] == 2.0
    backoff.reset()
    assert backoff.next_delay_s() == 0.05


def test_maintenance_interval_stays_well_inside_claim_idle() -> None:
    assert maintenance_interval_s(30_000) == 5.0
    assert maintenance_interval_s(600) == pytest.approx(0.2)
    assert maintenance_interval_s(10) == 0.1


def test_worker_status_mapping() -> None:
    status = WorkerStatus(worker_id="w", model="m", num_running=3, is_warm=True)
    mapping = status.to_mapping()
    assert (mapping["batch_size"], mapping["warm"], mapping["state"]) == ("3", "1", "starting")


def test_worker_status_reports_kv_use() -> None:
    status = WorkerStatus(worker_id="w", model="m")
    status.update(EngineStats(num_running=2, num_waiting=1, kv_tokens_used=40,
                              kv_tokens_budget=512))
    mapping = status.to_mapping()
    assert (mapping["batch_size"], mapping["waiting"]) == ("2", "1")
    assert (mapping["kv_tokens_used"], mapping["kv_tokens_budget"]) == ("40", "512")


def test_the_reserve_is_at_most_a_quarter_of_the_batch() -> None:
    from shared.settings import Settings

    assert Settings(interactive_reserve=4, max_batch_size=64).interactive_reserve_rows == 4
    assert Settings(interactive_reserve=4, max_batch_size=8).interactive_reserve_rows == 2
    assert Settings(interactive_reserve=4, max_batch_size=2).interactive_reserve_rows == 0
    assert Settings(interactive_reserve=0).interactive_reserve_rows == 0
