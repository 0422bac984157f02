"""The autoscaler's decisions against a real Redis, with stand-in worker processes (``sleep``)
and heartbeats written by hand: desired count, scale-up at once, drain only of workers idle
long enough, never of a busy or starting one, bootstrap when the model is unknown."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.keys import WORKER_GROUP, Keys
from tests.integration.waiting import wait_for
from tokenfleet.autoscale import Autoscaler, ScalePolicy, desired_workers, pid_of

KEYS = Keys("tfscale")
MODEL = "m"


def policy(**overrides: float) -> ScalePolicy:
    values: dict[str, float] = {"min_workers": 0, "max_workers": 3, "target_requests": 4,
                                "idle_s": 5.0}
    values.update(overrides)
    return ScalePolicy(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("depth", "expected"), [(0, 0), (1, 1), (4, 1), (5, 2), (12, 3),
                                                 (1000, 3)])
def test_desired_is_depth_over_target_within_bounds(depth: int, expected: int) -> None:
    assert desired_workers(depth, policy()) == expected
    assert desired_workers(0, policy(min_workers=2)) == 2


def test_policy_refuses_impossible_bounds() -> None:
    with pytest.raises(ValueError):
        policy(min_workers=4, max_workers=3)
    with pytest.raises(ValueError):
        policy(target_requests=0)


def test_pid_is_read_from_the_worker_id() -> None:
    assert pid_of("my-host-name-4242-a1b2c3") == 4242
    assert pid_of("garbage") is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def make_scaler(client: redis.Redis, procs: list[subprocess.Popen[bytes]], clock: Clock,
                **overrides: float) -> Autoscaler:
    def start(_name: str, _standby: bool) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "60"])
        procs.append(proc)
        return proc

    return Autoscaler(client, KEYS, MODEL, policy(**overrides), start, clock=clock)


def beat(client: redis.Redis, pid: int, *, state: str = "ready", running: int = 0) -> None:
    worker_id = f"host-{pid}-abcdef"
    client.hset(KEYS.worker(worker_id), mapping={"model": MODEL, "state": state,
                                                 "batch_size": running, "waiting": 0})
    client.zadd(KEYS.workers, {worker_id: time.time()})


def queue(client: redis.Redis, num: int, *, delivered: int = 0) -> None:
    stream = KEYS.requests_stream(MODEL, "interactive")
    for _ in range(num):
        client.xadd(stream, {"m": b"x"})
    client.xgroup_create(stream, WORKER_GROUP, id="0")
    if delivered:
        client.xreadgroup(WORKER_GROUP, "c", {stream: ">"}, count=delivered)


def test_unknown_model_gets_one_bootstrap_worker(client: redis.Redis,
                                                 procs: list[subprocess.Popen[bytes]]) -> None:
    scaler = make_scaler(client, procs, Clock())
    decision = scaler.tick()
    assert decision.started == ["worker-1"] and decision.desired == 1
    assert "bootstrap" in decision.reason
    state = json.loads(client.hget(KEYS.fleet_scaler, MODEL) or b"{}")
    assert state["desired"] == 1 and state["workers"] == 0
    decision = scaler.tick()  # starting counts as live: no second spawn, and no drain
    assert decision.started == [] and decision.drained == []
    assert (decision.desired, decision.workers) == (0, 1)  # goes once idle, like any other


def test_scales_up_at_once_and_down_only_after_idle(
        client: redis.Redis, procs: list[subprocess.Popen[bytes]]) -> None:
    client.sadd(KEYS.models, MODEL)
    clock = Clock()
    scaler = make_scaler(client, procs, clock)
    assert scaler.tick().started == []  # known model, empty queue: zero workers
    queue(client, 9, delivered=3)  # lag 6 + pending 3
    decision = scaler.tick()
    assert (decision.depth, decision.desired, len(decision.started)) == (9, 3, 3)
    client.delete(KEYS.requests_stream(MODEL, "interactive"))  # all served
    first, second, third = (w.proc.pid for w in scaler.workers)
    beat(client, first)
    beat(client, second, running=2)  # busy
    # third never beats: still starting
    assert scaler.tick().drained == []  # idle clock starts now
    clock.now += 4.9
    assert scaler.tick().drained == []
    clock.now += 0.2
    decision = scaler.tick()
    assert decision.drained == ["worker-1"]  # only the one idle for 5 s
    assert scaler.workers[0].is_draining
    beat(client, second)
    beat(client, third)
    clock.now += 5.1
    assert scaler.tick().drained == []  # idle clocks restarted when they turned idle
    clock.now += 5.0
    assert sorted(scaler.tick().drained) == ["worker-2", "worker-3"]
    for proc in procs:
        proc.wait(timeout=5)  # SIGTERM reached them
    scaler.tick()
    assert scaler.workers == [] and len(scaler.exited) == 3


def test_min_workers_are_kept_even_when_idle(client: redis.Redis,
                                             procs: list[subprocess.Popen[bytes]]) -> None:
    client.sadd(KEYS.models, MODEL)
    clock = Clock()
    scaler = make_scaler(client, procs, clock, min_workers=1)
    assert len(scaler.tick().started) == 1
    beat(client, scaler.workers[0].proc.pid)
    scaler.tick()
    clock.now += 60
    assert scaler.tick().drained == []


def test_a_worker_that_dies_is_replaced_while_the_queue_needs_it(
        client: redis.Redis, procs: list[subprocess.Popen[bytes]]) -> None:
    client.sadd(KEYS.models, MODEL)
    queue(client, 2)
    clock = Clock()
    scaler = make_scaler(client, procs, clock)
    assert scaler.tick().started == ["worker-1"]
    for attempt, backoff_s in ((1, 1.0), (2, 2.0)):
        scaler.workers[0].proc.kill()
        scaler.workers[0].proc.wait()
        held = scaler.tick()
        assert held.started == [] and "held back" in held.reason  # no crash loop storm
        clock.now += backoff_s - 0.01
        assert scaler.tick().started == []
        clock.now += 0.02
        assert scaler.tick().started == [f"worker-{attempt + 1}"]
    assert [(w.name, code) for w, code in scaler.exited] == [("worker-1", -9),
                                                             ("worker-2", -9)]
    beat(client, scaler.workers[0].proc.pid)  # it serves: the next crash waits 1 s again
    scaler.tick()
    scaler.workers[0].proc.kill()
    scaler.workers[0].proc.wait()
    scaler.tick()
    clock.now += 1.01
    assert scaler.tick().started == ["worker-4"]


SPARE = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: open(sys.argv[1], "w").write("promoted"))
open(sys.argv[2], "w").write("up")
time.sleep(60)
"""


def test_spares_are_kept_and_promoted_before_anything_starts(
        client: redis.Redis, procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    client.sadd(KEYS.models, MODEL)
    started: list[tuple[str, bool]] = []

    def start(name: str, standby: bool) -> subprocess.Popen[bytes]:
        started.append((name, standby))
        proc = subprocess.Popen([sys.executable, "-c", SPARE, str(tmp_path / f"{name}.promoted"),
                                 str(tmp_path / f"{name}.up")])
        procs.append(proc)
        return proc

    scaler = Autoscaler(client, KEYS, MODEL, policy(standby=1), start, clock=Clock())
    decision = scaler.tick()
    assert (decision.desired, decision.started) == (0, ["spare-1"])
    assert started == [("spare-1", True)]
    wait_for(lambda: (tmp_path / "spare-1.up").exists(), timeout_s=10)
    queue(client, 2)
    assert scaler.tick().promoted == []  # no heartbeat yet: not signalled, a worker starts
    assert started[-1] == ("worker-2", False)
    client.delete(KEYS.requests_stream(MODEL, "interactive"))
    queue(client, 6)  # desired 2: one live, the spare is promoted once it heartbeats
    beat(client, procs[0].pid, state="standby")
    decision = scaler.tick()
    assert decision.promoted == ["spare-1"] and decision.started == ["spare-3"]
    wait_for(lambda: (tmp_path / "spare-1.promoted").exists(), timeout_s=10)
    assert procs[0].poll() is None  # SIGUSR1 promoted it, did not kill it
    state = json.loads(client.hget(KEYS.fleet_scaler, MODEL) or b"{}")
    assert (state["workers"], state["desired"], state["standby"]) == (1, 2, 1)  # before -> target
