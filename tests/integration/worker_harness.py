"""The real worker loop (null engine) in threads against a real Redis, for tests.

``WorkerFactory.start`` builds a ``WorkerService`` the way ``worker.main`` does and runs its
``run()`` loop in a thread; tests pass ``service_class``/``engine_class`` subclasses to pause
a worker between polls or inside a step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from shared.keys import WORKER_GROUP, Keys
from shared.protocol import GenerateRequest, SamplingParams, TokenEvent, pack, unpack_events
from shared.settings import Settings
from tests.integration import waiting
from worker.heartbeat import STATE_READY, Heartbeat, WorkerStatus
from worker.main import make_worker_id, start_heartbeat
from worker.null_engine import NullEngine, null_model_info
from worker.service import WorkerService

MODEL = "null-model"
PREFIX = "tftest"
CHANNEL = f"{PREFIX}:events:gw-test"
KEYS = Keys(PREFIX)
TIMEOUT_S = 10.0


@dataclass
class RunningWorker:
    service: WorkerService
    engine: NullEngine
    heartbeat: Heartbeat
    thread: threading.Thread
    exit_codes: list[int] = field(default_factory=list)

    @property
    def worker_id(self) -> str:
        return self.service.status.worker_id

    def wait_ready(self) -> None:
        wait_for(lambda: self.service.status.state == STATE_READY)

    def stop(self) -> None:
        self.service.request_stop()
        self.thread.join(TIMEOUT_S)
        self.heartbeat.stop()
        assert not self.thread.is_alive()


def wait_for(predicate: Callable[[], object], timeout_s: float = TIMEOUT_S) -> None:
    waiting.wait_for(predicate, timeout_s)


class WorkerFactory:
    """Starts workers on one Redis; ``stop_all`` stops every one still running."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.started: list[RunningWorker] = []

    def start(self, step_delay_s: float = 0.0, *,
              service_class: type[WorkerService] = WorkerService,
              engine_class: type[NullEngine] = NullEngine,
              **overrides: object) -> RunningWorker:
        values: dict[str, object] = {
            "redis_url": self.redis_url, "key_prefix": PREFIX, "served_model_name": MODEL,
            "engine": "null", "heartbeat_interval_s": 0.1, "coalesce_ms": 20.0,
            **overrides,
        }
        settings = Settings(**values)  # type: ignore[arg-type]
        engine = engine_class(settings.max_batch_size, settings.null_engine_tokens,
                              step_delay_s, kv_tokens_budget=settings.max_batch_tokens)
        status = WorkerStatus(worker_id=make_worker_id(), model=MODEL)
        heartbeat = start_heartbeat(settings, status)
        service = service_class(settings, engine, null_model_info(MODEL, settings.max_batch_tokens),
                                status=status)
        worker = RunningWorker(service, engine, heartbeat, threading.Thread(target=lambda: None))
        worker.thread = threading.Thread(
            target=lambda: worker.exit_codes.append(service.run()), daemon=True)
        worker.thread.start()
        self.started.append(worker)
        worker.wait_ready()
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.thread.is_alive():
                worker.stop()


def make_request(job_id: str, max_tokens: int = 5, **kwargs: object) -> GenerateRequest:
    return GenerateRequest(id=job_id, model=MODEL, prompt_token_ids=[1, 2, 3],
                           params=SamplingParams(max_tokens=max_tokens), reply_channel=CHANNEL,
                           created_at=time.time(), **kwargs)  # type: ignore[arg-type]


def submit(client: redis.Redis, request: GenerateRequest, lane: str = "interactive") -> bytes:
    return client.xadd(KEYS.requests_stream(MODEL, lane), {"m": pack(request)})


def job(client: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(KEYS.job(job_id)).items()}


def wait_finished(client: redis.Redis, job_id: str) -> dict[str, str]:
    wait_for(lambda: job(client, job_id).get("status") in {"succeeded", "failed", "cancelled"})
    return job(client, job_id)


def stored_events(client: redis.Redis, job_id: str) -> list[TokenEvent]:
    packed = client.lrange(KEYS.job_events(job_id), 0, -1)
    return [event for raw in packed for event in unpack_events(b"\x91" + raw)]


def num_pending(client: redis.Redis, lane: str = "interactive") -> int:
    return int(client.xpending(KEYS.requests_stream(MODEL, lane), WORKER_GROUP)["pending"])


class Listener:
    """A subscriber on the reply channel that collects event batches."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(CHANNEL)
        self.events: list[TokenEvent] = []
        self.batches = 0

    def collect(self, num_terminal: int) -> list[TokenEvent]:
        deadline = time.monotonic() + TIMEOUT_S
        while sum(e.is_terminal for e in self.events) < num_terminal:
            assert time.monotonic() < deadline, "no terminal event in time"
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                self.events.extend(unpack_events(message["data"]))
                self.batches += 1
        return self.events
