"""Closed and open loops: who sends what, when, and when a load is exhausted."""

from __future__ import annotations

import itertools

import pytest

from bench.loadgen import OPEN_LOOP_CLIENT, ClosedLoop, OpenLoop, poisson_offsets
from bench.workload import make_requests, split_among_clients


def test_closed_loop_sends_one_per_client_then_the_next_on_finish() -> None:
    load = ClosedLoop(split_among_clients(make_requests("mixed", 6), 3))
    first = load.start(10.0)
    assert [s.client for s in first] == [0, 1, 2]
    assert all(s.submitted == 10.0 for s in first)
    assert not load.is_exhausted and load.due(11.0) == [] and load.next_arrival() is None
    [nxt] = load.finished(1, 12.5)
    assert nxt.client == 1 and nxt.submitted == 12.5
    seen = {s.request.index for s in first} | {nxt.request.index}
    for client in (0, 2):
        seen |= {s.request.index for s in load.finished(client, 13.0)}
    assert seen == set(range(6))
    for client in (0, 1, 2):
        assert load.finished(client, 14.0) == []
    assert load.is_exhausted


def test_closed_loop_with_more_clients_than_requests_leaves_the_rest_idle() -> None:
    load = ClosedLoop(split_among_clients(make_requests("mixed", 2), 4))
    assert len(load.start(0.0)) == 2
    load.finished(0, 1.0)
    assert not load.is_exhausted
    load.finished(1, 1.0)
    assert load.is_exhausted


def test_closed_loop_with_a_duration_cycles_with_fresh_ids_until_the_deadline() -> None:
    load = ClosedLoop(split_among_clients(make_requests("mixed", 2), 1), duration_s=5.0)
    [sub] = load.start(100.0)
    ids = [sub.request_id]
    budgets = [sub.request.max_tokens]
    for t in (101.0, 102.0, 103.0):
        [sub] = load.finished(0, t)
        ids.append(sub.request_id)
        budgets.append(sub.request.max_tokens)
    assert len(set(ids)) == 4  # laps get new indices, so request ids never repeat
    assert budgets == [16, 256, 16, 256]
    assert load.finished(0, 105.0) == [] and load.is_exhausted


def test_open_loop_releases_requests_at_their_arrival_times() -> None:
    reqs = make_requests("uniform", 3)
    load = OpenLoop(reqs, [0.0, 0.5, 2.0])
    first = load.start(100.0)
    assert [s.request.index for s in first] == [0]
    assert load.next_arrival() == 100.5
    assert load.due(100.4) == []
    [second] = load.due(101.0)
    assert second.submitted == 100.5  # scheduled time, not when the driver got round to it
    assert second.client == OPEN_LOOP_CLIENT and load.finished(OPEN_LOOP_CLIENT, 101.0) == []
    assert not load.is_exhausted
    assert [s.request.index for s in load.due(103.0)] == [2]
    assert load.is_exhausted and load.next_arrival() is None


def test_open_loop_needs_one_offset_per_request() -> None:
    with pytest.raises(ValueError):
        OpenLoop(make_requests("uniform", 2), [0.0])


def test_poisson_offsets_are_seeded_increasing_and_near_the_rate() -> None:
    offsets = poisson_offsets(10.0, count=2000)
    assert offsets == poisson_offsets(10.0, count=2000)
    assert all(b > a for a, b in itertools.pairwise(offsets))
    assert 180 < offsets[-1] < 220  # 2000 arrivals at 10/s: about 200 s
    within = poisson_offsets(10.0, duration_s=30.0)
    assert within[-1] <= 30.0 and 240 < len(within) < 360
    with pytest.raises(ValueError):
        poisson_offsets(0.0, count=3)
    with pytest.raises(ValueError):
        poisson_offsets(1.0)
