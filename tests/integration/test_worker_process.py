"""The worker as a process: ``python -m worker.main``, signals, drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from shared.keys import WORKER_GROUP, Keys
from shared.protocol import GenerateRequest, SamplingParams, pack
from tests.integration import waiting

pytestmark = pytest.mark.integration

MODEL = "null-model"
KEYS = Keys("tftest")  # the prefix the tf_env fixture sets
TIMEOUT_S = 15.0

# A worker whose null engine takes ``step_delay_s`` per step, so requests stay in flight.
SLOW_WORKER = """
import sys
from shared.settings import Settings
from worker.main import setup_logging, run
from worker.null_engine import NullEngine, null_model_info

def build(settings):
    engine = NullEngine(settings.max_batch_size, settings.null_engine_tokens, {step_delay_s})
    return engine, null_model_info(settings.model_name)

settings = Settings()
setup_logging(settings)
sys.exit(run(settings, build=build))
"""


def wait_for(predicate: Callable[[], object], timeout_s: float = TIMEOUT_S) -> None:
    waiting.wait_for(predicate, timeout_s)


@pytest.fixture
def spawn(tf_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        full_env = {**tf_env, "TOKENFLEET_ENGINE": "null",
                    "TOKENFLEET_SERVED_MODEL_NAME": MODEL, "TOKENFLEET_COALESCE_MS": "5",
                    "TOKENFLEET_HEARTBEAT_INTERVAL_S": "0.1", **env}
        proc = subprocess.Popen([sys.executable, *argv], env=full_env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def submit(client: redis.Redis, job_id: str, max_tokens: int) -> None:
    request = GenerateRequest(id=job_id, model=MODEL, prompt_token_ids=[1, 2],
                              params=SamplingParams(max_tokens=max_tokens),
                              created_at=time.time())
    client.xadd(KEYS.requests_stream(MODEL), {"m": pack(request)})


def status(client: redis.Redis, job_id: str) -> str | None:
    value = client.hget(KEYS.job(job_id), "status")
    return value.decode() if value else None


def wait_ready(client: redis.Redis) -> None:
    def is_ready() -> bool:
        ids = client.zrange(KEYS.workers, 0, -1)
        return any(client.hget(KEYS.worker(i.decode()), "state") == b"ready" for i in ids)

    wait_for(is_ready)


def is_draining(client: redis.Redis) -> bool:
    """True once a worker's heartbeat says it is draining (it has stopped reading)."""
    ids = client.zrange(KEYS.workers, 0, -1)
    return any(client.hget(KEYS.worker(i.decode()), "state") == b"draining" for i in ids)


def num_pending(client: redis.Redis) -> int:
    return int(client.xpending(KEYS.requests_stream(MODEL), WORKER_GROUP)["pending"])


def test_python_m_worker_main_serves_and_stops_on_sigint(
        spawn: Callable[..., subprocess.Popen[bytes]], client: redis.Redis) -> None:
    proc = spawn(["-m", "worker.main"])
    wait_ready(client)
    submit(client, "job-main", max_tokens=4)
    wait_for(lambda: status(client, "job-main") == "succeeded")

    proc.send_signal(signal.SIGINT)

    assert proc.wait(TIMEOUT_S) == 0
    assert client.zcard(KEYS.workers) == 0


def test_sigterm_finishes_in_flight_requests_then_exits_0(
        spawn: Callable[..., subprocess.Popen[bytes]], client: redis.Redis) -> None:
    proc = spawn(["-c", SLOW_WORKER.format(step_delay_s=0.05)],
                 TOKENFLEET_NULL_ENGINE_TOKENS="20")
    wait_ready(client)
    ids = [f"drain-{i}" for i in range(3)]
    for job_id in ids:
        submit(client, job_id, max_tokens=20)
    wait_for(lambda: all(status(client, job_id) == "running" for job_id in ids))

    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: is_draining(client) or proc.poll() is not None)  # it reads no more
    submit(client, "after-sigterm", max_tokens=20)

    assert proc.wait(TIMEOUT_S) == 0
    assert [status(client, job_id) for job_id in ids] == ["succeeded"] * 3
    assert status(client, "after-sigterm") is None  # not read while draining
    assert num_pending(client) == 0


def test_drain_timeout_leaves_unfinished_requests_pending_for_others(
        spawn: Callable[..., subprocess.Popen[bytes]], client: redis.Redis) -> None:
    proc = spawn(["-c", SLOW_WORKER.format(step_delay_s=0.05)],
                 TOKENFLEET_NULL_ENGINE_TOKENS="1000", TOKENFLEET_DRAIN_TIMEOUT_S="0.3",
                 TOKENFLEET_CLAIM_IDLE_MS="60000")
    wait_ready(client)
    submit(client, "job-long", max_tokens=1000)
    wait_for(lambda: status(client, "job-long") == "running")

    proc.send_signal(signal.SIGTERM)

    assert proc.wait(TIMEOUT_S) == 0
    assert status(client, "job-long") == "running"
    pending = client.xpending_range(KEYS.requests_stream(MODEL), WORKER_GROUP, "-", "+", 10)
    assert len(pending) == 1
    assert pending[0]["time_since_delivered"] >= 60_000  # handed back: claimable at once
