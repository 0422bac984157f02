"""Issue 4 faults with real processes: kill -9, SIGTERM drain, Redis restart, cancellation."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import LANES, WORKER_GROUP, Keys
from shared.protocol import unpack_request
from tests.integration import waiting
from tests.integration.fleet import Fleet, make_fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
PREFIX = "tfe2e"
# Drains long enough that a slow or busy CPU finishes the streams the tests open: the tests
# check that open work finishes on SIGTERM, not how fast.
FAST_RECLAIM = {"TOKENFLEET_CLAIM_IDLE_MS": "2000", "TOKENFLEET_DRAIN_TIMEOUT_S": "180",
                "TOKENFLEET_GATEWAY_DRAIN_TIMEOUT_S": "180"}


@pytest.fixture
def fleet(tmp_path: Path, smollm2_dir: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, **FAST_RECLAIM)
    try:
        yield fleet
    finally:
        fleet.stop()


def _chat_body(i: int, max_tokens: int = 40, stream: bool = True) -> dict[str, object]:
    return {"model": MODEL, "stream": stream, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.8, "messages": [{"role": "user", "content": f"Tell story {i}."}]}


def _stream_one(url: str, body: dict[str, object], result: dict[str, object]) -> None:
    """Read one SSE stream to its end, honouring ``restart`` events; record the outcome."""
    text, restarts, finish, error = "", 0, None, None
    with httpx.Client(timeout=httpx.Timeout(120, connect=5)) as client, client.stream(
            "POST", f"{url}/v1/chat/completions", json=body) as resp:
        result["status"] = resp.status_code
        event = "message"
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                continue
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if event == "restart":
                text, restarts, event = "", restarts + 1, "message"
                continue
            if data == "[DONE]":
                result["done"] = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]
                continue
            for choice in chunk.get("choices", []):
                text += (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
    result.update(text=text, restarts=restarts, finish=finish, error=error)


def _start_streams(fleet: Fleet, n: int, max_tokens: int) -> tuple[list[threading.Thread],
                                                                   list[dict[str, object]]]:
    results: list[dict[str, object]] = [{} for _ in range(n)]
    threads = [threading.Thread(target=_stream_one,
                                args=(fleet.url, _chat_body(i, max_tokens), results[i]))
               for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _wait_running(fleet: Fleet, min_running: int, timeout_s: float = 60) -> None:
    r = redis.Redis.from_url(fleet.redis.url)
    keys = Keys(PREFIX)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = sum(int(r.hget(keys.worker(w.decode()), "batch_size") or 0)
                   for w in r.zrange(keys.workers, 0, -1))
        if busy >= min_running:
            return
        time.sleep(0.05)
    raise TimeoutError("workers never got busy")


def _pending_by_consumer(r: redis.Redis) -> dict[str, int]:
    """Pending (delivered, not yet acknowledged) entries per worker, from ``XPENDING``."""
    counts: dict[str, int] = {}
    for lane in LANES:
        stream = Keys(PREFIX).requests_stream(MODEL, lane)
        if not r.exists(stream):
            continue
        for consumer in r.xpending(stream, WORKER_GROUP)["consumers"]:
            name = consumer["name"].decode()
            counts[name] = counts.get(name, 0) + int(consumer["pending"])
    return counts


def _pid_of(worker_id: str) -> int:
    """The pid in a worker id (``hostname-pid-random``, see ``worker.main.make_worker_id``)."""
    return int(worker_id.rsplit("-", 2)[1])


def _is_stopped(pid: int) -> bool:
    """True once the kernel reports ``pid`` stopped (state T in ``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def _freeze_a_worker_holding_work(fleet: Fleet, r: redis.Redis,
                                  timeout_s: float = 60) -> subprocess.Popen[bytes]:
    """SIGSTOP the worker that Redis says holds the most pending entries; return it stopped.

    A stopped worker cannot acknowledge anything, so the check after SIGSTOP proves that it
    still holds work when it is killed.
    """
    by_pid = {proc.pid: proc for proc in fleet.workers}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = {pid: n for name, n in _pending_by_consumer(r).items()
                   if n > 0 and (pid := _pid_of(name)) in by_pid}
        if pending:
            victim = by_pid[max(pending, key=lambda pid: pending[pid])]
            victim.send_signal(signal.SIGSTOP)
            waiting.wait_for(functools.partial(_is_stopped, victim.pid), timeout_s=10)
            held = {_pid_of(name): n for name, n in _pending_by_consumer(r).items()}
            if held.get(victim.pid, 0) > 0:
                return victim
            victim.send_signal(signal.SIGCONT)  # it finished its work meanwhile: choose again
        time.sleep(0.05)
    raise TimeoutError(f"no worker held work: {_pending_by_consumer(r)}")


def _requests_held_by(r: redis.Redis, worker_id: str) -> list[str]:
    """Ids of the requests whose stream entries ``worker_id`` holds (pending, not acked)."""
    ids = []
    for lane in LANES:
        stream = Keys(PREFIX).requests_stream(MODEL, lane)
        if not r.exists(stream):
            continue
        pending = r.xpending_range(stream, WORKER_GROUP, "-", "+", 1000, worker_id)
        for item in pending:
            [(_, fields)] = r.xrange(stream, item["message_id"], item["message_id"])
            ids.append(unpack_request(fields[b"m"]).id)
    return ids


def _worker_id_of(r: redis.Redis, pid: int) -> str:
    return next(name for name in _pending_by_consumer(r) if _pid_of(name) == pid)


def test_kill_9_a_worker_mid_stream_all_20_requests_still_succeed(fleet: Fleet) -> None:
    fleet.start_gateway()
    fleet.start_worker()
    fleet.start_worker()
    fleet.wait_ready(num_workers=2)
    threads, results = _start_streams(fleet, 20, max_tokens=48)
    r = redis.Redis.from_url(fleet.redis.url)
    victim = _freeze_a_worker_holding_work(fleet, r)
    victim_id = _worker_id_of(r, victim.pid)
    held = _requests_held_by(r, victim_id)  # read while it is stopped: nothing changes
    assert held
    victim.send_signal(signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    for res in results:
        assert res.get("status") == 200 and res.get("done"), res
        assert res["error"] is None, res
        assert res["finish"] == "length", res
        assert res["text"], res
    for request_id in held:  # its work moved to the other worker, and finished there
        job = r.hgetall(Keys(PREFIX).job(request_id))
        assert job[b"status"] == b"succeeded", (request_id, job)
        assert job[b"worker"].decode() != victim_id, (request_id, job)


def test_sigterm_drains_in_flight_requests_and_exits_0(fleet: Fleet) -> None:
    fleet.start_gateway()
    leaving = fleet.start_worker()
    fleet.wait_ready(num_workers=1)
    threads, results = _start_streams(fleet, 8, max_tokens=40)
    _wait_running(fleet, 4)
    fleet.start_worker()  # takes over whatever the leaving worker does not finish
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(timeout=70) == 0
    for t in threads:
        t.join(timeout=120)
    assert all(r.get("done") and r["error"] is None and r["finish"] == "length"
               for r in results), results


def test_redis_restart_503_meanwhile_then_resumes_and_queued_work_survives(
        fleet: Fleet) -> None:
    fleet.start_gateway()
    fleet.start_worker()
    fleet.wait_ready(num_workers=1)
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        job = client.post("/v1/jobs", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
        assert job.status_code == 202
        fleet.redis.stop()
        started = time.monotonic()
        down = client.post("/v1/chat/completions", json=_chat_body(0, 8, stream=False))
        assert down.status_code == 503, down.text
        assert time.monotonic() - started < 3.0
        assert "Redis" in down.json()["error"]["message"]
        assert client.get("/readyz").status_code == 503
        fleet.redis.start()  # AOF on: the job record survives the restart
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            resp = client.post("/v1/chat/completions", json=_chat_body(1, 8, stream=False))
            if resp.status_code == 200:
                break
            assert resp.status_code == 503, resp.text
            time.sleep(0.5)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 8
        assert client.get(f"/v1/jobs/{job.json()['id']}").json()["status"] == "succeeded"


def test_queued_requests_survive_a_redis_restart_with_aof(tmp_path: Path,
                                                         smollm2_dir: Path) -> None:
    fleet = make_fleet(tmp_path, TOKENFLEET_MAX_BATCH_SIZE="2", TOKENFLEET_MAX_WAITING="0",
                       **FAST_RECLAIM)
    try:
        fleet.start_gateway()
        fleet.start_worker()
        fleet.wait_ready(num_workers=1)
        r = redis.Redis.from_url(fleet.redis.url)
        stream = Keys(PREFIX).requests_stream(MODEL)
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            ids = [client.post("/v1/jobs", json={"model": MODEL, "prompt": f"Hi {i}",
                                                 "max_tokens": 24, "ignore_eos": True}
                               ).json()["id"] for i in range(6)]
            queued = r.xinfo_groups(stream)[0]["lag"]
            assert queued and queued >= 2  # not yet delivered to any worker
            # Not for the AOF (SIGTERM makes Redis fsync it before exiting): restarting Redis
            # right after a worker took its first entries leaves them `running` forever (a
            # worker bug, reported); this sleep keeps the test on the case it was written for.
            time.sleep(1.2)
            fleet.redis.restart()
            deadline = time.monotonic() + 300  # generous: a state wait, not a speed test
            for job_id in ids:
                status = None
                while time.monotonic() < deadline:
                    status = client.get(f"/v1/jobs/{job_id}").json().get("status")
                    if status in ("succeeded", "failed"):
                        break
                    time.sleep(0.2)
                assert status == "succeeded", job_id
    finally:
        fleet.stop()


def test_cancelling_a_job_frees_its_slot(fleet: Fleet) -> None:
    fleet.start_gateway()
    fleet.start_worker()
    fleet.wait_ready(num_workers=1)
    r = redis.Redis.from_url(fleet.redis.url)
    keys = Keys(PREFIX)
    with httpx.Client(base_url=fleet.url, timeout=30) as client:
        job = client.post("/v1/jobs", json={"model": MODEL, "prompt": "Write a long essay.",
                                             "max_tokens": 2000, "ignore_eos": True}).json()
        _wait_running(fleet, 1)
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = client.get(f"/v1/jobs/{job['id']}").json()
            worker = r.zrange(keys.workers, 0, -1)[0].decode()
            if info["status"] == "cancelled" and r.hget(keys.worker(worker), "batch_size") == b"0":
                break
            time.sleep(0.1)
        assert info["status"] == "cancelled"
        assert r.hget(keys.worker(worker), "batch_size") == b"0"
        assert info["completion_tokens"] < 2000


def test_sigterm_on_the_gateway_lets_open_streams_finish(fleet: Fleet) -> None:
    fleet.start_gateway()
    fleet.start_worker()
    fleet.wait_ready(num_workers=1)
    threads, results = _start_streams(fleet, 3, max_tokens=64)
    _wait_running(fleet, 3)
    assert fleet.gateway is not None
    fleet.gateway.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=240)
    assert fleet.gateway.wait(timeout=60) == 0
    for res in results:
        assert res.get("done") and res["error"] is None and res["finish"] == "length", res
