"""Issue 9, scale to zero on one machine: a real fleet (redis-server, a gateway with
``TOKENFLEET_SCALE_TO_ZERO``, the autoscaler starting real ``tokenfleet worker`` processes)
goes 0 -> at least 2 workers under a burst of requests and back to 0 when idle; every
request succeeds, none is restarted (no worker was killed while serving), every worker
exits 0 after a drain it got only while idle, nothing stays pending."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import WORKER_GROUP, Keys
from tests.integration.fleet import REPO, Fleet, make_fleet
from tests.integration.waiting import wait_for
from tokenfleet.autoscale import Autoscaler, ScalePolicy, run
from tokenfleet.supervisor import role_argv

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
PREFIX = "tfe2e"  # make_fleet's
TOKENS = 8
BURST = 16
POLICY = ScalePolicy(min_workers=0, max_workers=3, target_requests=4, idle_s=1.5)


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.time()
        self.events: list[tuple[float, str]] = []

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))

    def render(self) -> str:
        return "\n".join(f"{time.strftime('%H:%M:%S', time.localtime(t))}"
                         f".{int(t % 1 * 1000):03d}  +{t - self.t0:6.2f} s  {what}"
                         for t, what in self.events)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, TOKENFLEET_ENGINE="null", TOKENFLEET_SCALE_TO_ZERO="true",
                       TOKENFLEET_NULL_ENGINE_TOKENS=str(TOKENS),
                       TOKENFLEET_NULL_ENGINE_STEP_MS="100", TOKENFLEET_MAX_BATCH_SIZE="4")
    try:
        fleet.start_gateway()
        yield fleet
    finally:
        fleet.stop()


def start_worker_in(fleet: Fleet) -> object:
    def start(name: str, _standby: bool) -> subprocess.Popen[bytes]:
        log = open(fleet.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with it
        return subprocess.Popen(role_argv("worker"), cwd=REPO,
                                env=fleet.env, stdout=log, stderr=subprocess.STDOUT)
    return start


def stream(url: str, i: int) -> str:
    body = {"model": MODEL, "prompt": f"burst {i}", "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        return "\n".join(response.iter_lines())


def test_scales_from_zero_to_several_and_back_to_zero(fleet: Fleet) -> None:
    client = redis.Redis.from_url(fleet.redis.url)
    keys = Keys(PREFIX)
    scaler = Autoscaler(client, keys, MODEL, POLICY, start_worker_in(fleet))  # type: ignore[arg-type]
    stop = threading.Event()
    timeline = Timeline()
    peak = 0

    def loop() -> None:
        run(scaler, stop.is_set, tick_s=0.1)

    def watch_peak() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, scaler.num_live)
            time.sleep(0.05)

    threads = [threading.Thread(target=loop, daemon=True),
               threading.Thread(target=watch_peak, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        timeline.note("autoscaler started (fresh Redis: the model is unknown)")
        wait_for(lambda: client.sismember(keys.models, MODEL), timeout_s=60, interval_s=0.1)
        timeline.note("bootstrap worker published the model")
        wait_for(lambda: scaler.num_live == 0 and not scaler.workers, timeout_s=30,
                 interval_s=0.05)
        timeline.note("idle bootstrap worker drained: 0 workers")
        ready = httpx.get(f"{fleet.url}/readyz").json()
        assert ready["workers"] == 0 and ready["scale_to_zero"] is True
        peak = 0

        timeline.note(f"burst: {BURST} streaming requests at an empty fleet")
        with ThreadPoolExecutor(BURST) as pool:
            futures = [pool.submit(stream, fleet.url, i) for i in range(BURST)]
            wait_for(lambda: scaler.num_live >= 2, timeout_s=30, interval_s=0.02)
            timeline.note(f"{scaler.num_live} workers started")
            bodies = [future.result(timeout=120) for future in futures]
        timeline.note(f"all {BURST} requests answered; peak {peak} workers")
        wait_for(lambda: scaler.num_live == 0 and not scaler.workers, timeout_s=60,
                 interval_s=0.05)
        timeline.note("idle workers drained: 0 workers")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        scaler.stop(timeout_s=30)
    print("\n" + timeline.render())  # the run's timestamps (pytest -s shows them)

    assert peak >= 2
    for body in bodies:
        assert "event: restart" not in body  # no request was taken from a killed worker
        chunks = [json.loads(line[6:]) for line in body.split("\n")
                  if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert len(text.split()) == TOKENS
        assert body.rstrip().endswith("data: [DONE]")
    assert len(scaler.exited) >= 1 + 2  # the bootstrap worker and the burst's
    for worker, code in scaler.exited:
        assert worker.is_draining and code == 0, (worker.name, code)
    for lane in ("interactive", "batch"):
        stream_key = keys.requests_stream(MODEL, lane)
        if client.exists(stream_key):
            assert client.xpending(stream_key, WORKER_GROUP)["pending"] == 0
    assert client.xlen(keys.dead_letter_stream(MODEL)) == 0
    assert json.loads(client.hget(keys.fleet_scaler, MODEL) or b"{}")["desired"] == 0
    client.close()


def test_a_standby_spare_serves_the_first_request_from_zero(fleet: Fleet) -> None:
    """With one spare (loaded, not reading the queue) a request at an empty fleet is served
    by the promoted spare, and a new spare takes its place."""
    client = redis.Redis.from_url(fleet.redis.url)
    keys = Keys(PREFIX)

    def start(name: str, standby: bool) -> subprocess.Popen[bytes]:
        log = open(fleet.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with it
        env = {**fleet.env, "TOKENFLEET_WORKER_STANDBY": str(standby).lower()}
        return subprocess.Popen(role_argv("worker"), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)

    policy = ScalePolicy(min_workers=0, max_workers=2, target_requests=4, idle_s=1.0,
                         standby=1)
    scaler = Autoscaler(client, keys, MODEL, policy, start)  # type: ignore[arg-type]
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(scaler, stop.is_set, 0.1), daemon=True)
    thread.start()

    def states() -> dict[int, str]:
        ids = [raw.decode() for raw in client.zrange(keys.workers, 0, -1)]
        return {int(i.rsplit("-", 2)[1]): (client.hget(keys.worker(i), "state") or b"").decode()
                for i in ids}

    try:
        wait_for(lambda: client.sismember(keys.models, MODEL), timeout_s=60, interval_s=0.1)
        wait_for(lambda: [w.is_standby for w in scaler.workers] == [True]
                 and states().get(scaler.workers[0].proc.pid) == "standby",
                 timeout_s=60, interval_s=0.1)  # bootstrap gone, the spare loaded
        spare = scaler.workers[0]
        assert httpx.get(f"{fleet.url}/readyz").json()["workers"] == 0  # a spare is not ready
        response = httpx.post(f"{fleet.url}/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "hello", "max_tokens": 4})
        assert response.status_code == 200, response.text
        job = httpx.get(f"{fleet.url}/v1/jobs/{response.json()['id']}").json()
        assert f"-{spare.proc.pid}-" in job["worker"]  # the promoted spare served it
        assert spare.promoted_at is not None and not spare.is_standby
        wait_for(lambda: [states().get(w.proc.pid) for w in scaler.workers
                          if w.is_standby] == ["standby"],
                 timeout_s=30, interval_s=0.1)  # a new spare replaces it, loaded
    finally:
        stop.set()
        thread.join(timeout=5)
        scaler.stop(timeout_s=30)
        client.close()
    assert all(code == 0 for worker, code in scaler.exited), scaler.exited
