"""The real worker loop (``worker.service.WorkerService``) in a thread, for gateway tests.

Only the model is a stand-in: ``ScriptedEngine`` wraps the null engine (``worker.null_engine``)
and answers every request with ``reply`` (one word per step; "stop" when the reply ends
before ``max_tokens``, as a model's end-of-sequence token would). Words in the prompt ask
for what a real model or machine does now and then:

- ``FAIL``: the request fails (``error`` event "the fake model failed");
- ``STALL``: the request never makes progress (until it is cancelled);
- ``SLOW``: 50 ms per step while such a request runs;
- ``RESTART``: the worker process dies after the first word ("partial") and its supervisor
  starts a new one, which reclaims the request (a real ``restart`` event) and answers it.

Everything on Redis (job hash, events, text, pub/sub, acks, heartbeat, model info) is
written by the real worker code, so the gateway is tested against what workers really do.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from tokenizers import Tokenizer

from shared.keys import Keys
from shared.model_info import ModelInfo
from shared.redis_conn import sync_client
from shared.settings import Settings
from worker.engine.types import EngineRequest, EngineStats, RequestOutput
from worker.heartbeat import STATE_READY, Heartbeat, WorkerStatus
from worker.null_engine import NullEngine
from worker.service import ShutdownSignal, WorkerService

DEFAULT_REPLY = ("Hello", ",", " world", "!")
FAILURE_MESSAGE = "the fake model failed"
SLOW_STEP_S = 0.05
STALLED_STEP_S = 0.01  # a step with only stalled requests: don't spin a CPU
STOP_TIMEOUT_S = 10.0


class SimulatedCrash(Exception):
    """Raised by the engine to make its worker process 'die' (``RESTART``)."""


@dataclass
class Script:
    """What the stand-in model does; shared by the worker and the restarts of it."""

    reply: tuple[str, ...] = DEFAULT_REPLY
    served: list[str] = field(default_factory=list)  # request ids admitted, in order
    crashed: set[str] = field(default_factory=set)  # RESTART requests that killed a worker


class ScriptedEngine:
    """The null engine with a scripted reply and the prompt directives above."""

    def __init__(self, script: Script, decode: Callable[[list[int]], str],
                 max_batch_size: int) -> None:
        self.script = script
        self._decode = decode
        self._null = NullEngine(max_batch_size, num_tokens=len(script.reply))
        self._max_tokens: dict[str, int] = {}
        self._directives: dict[str, set[str]] = {}
        self._stalled: set[str] = set()
        self._finished_now: list[RequestOutput] = []  # failures and cancelled stalls

    def add_request(self, request: EngineRequest) -> None:
        prompt = self._decode(request.prompt_token_ids)
        directives = {word for word in ("FAIL", "STALL", "SLOW", "RESTART") if word in prompt}
        if "RESTART" in directives and request.id in self.script.crashed:
            directives.discard("RESTART")  # it killed one worker already
        self.script.served.append(request.id)
        self._directives[request.id] = directives
        if "FAIL" in directives:
            self._finished_now.append(RequestOutput(
                id=request.id, finished=True, finish_reason="error", error=FAILURE_MESSAGE,
                num_prompt_tokens=len(request.prompt_token_ids)))
        elif "STALL" in directives:
            self._stalled.add(request.id)
        else:
            self._max_tokens[request.id] = request.params.max_tokens
            self._null.add_request(request)

    def abort_request(self, request_id: str) -> None:
        if request_id in self._stalled:
            self._stalled.discard(request_id)
            self._finished_now.append(RequestOutput(id=request_id, finished=True,
                                                    finish_reason="cancelled"))
        self._null.abort_request(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._null.has_unfinished() or self._stalled or self._finished_now)

    def num_free_slots(self) -> int:
        return self._null.num_free_slots() - len(self._stalled)

    def release_idle_memory(self) -> None:
        self._null.release_idle_memory()

    def stats(self) -> EngineStats:
        stats = self._null.stats()
        stats.num_running += len(self._stalled)
        return stats

    def step(self) -> list[RequestOutput]:
        running = set(self._max_tokens)
        if any("RESTART" in self._directives[i] and i in self.script.crashed for i in running):
            raise SimulatedCrash("the worker died mid-answer (RESTART)")
        if any("SLOW" in self._directives[i] for i in running):
            time.sleep(SLOW_STEP_S)
        elif self._stalled and not running:
            time.sleep(STALLED_STEP_S)
        outputs, self._finished_now = self._finished_now, []
        for out in self._null.step():
            outputs.append(self._scripted(out))
        return outputs

    def _scripted(self, out: RequestOutput) -> RequestOutput:
        reply = self.script.reply
        if out.text_delta:
            out.text_delta = reply[out.num_output_tokens - 1]
            if "RESTART" in self._directives[out.id]:
                out.text_delta = "partial"
                self.script.crashed.add(out.id)  # the next step kills the worker
        if out.finished:
            if out.finish_reason == "length" and len(reply) <= self._max_tokens[out.id]:
                out.finish_reason = "stop"  # the reply ended: the model's end of sequence
            del self._max_tokens[out.id]
        return out


@dataclass
class RunningWorker:
    """A handle on a worker started by ``running_worker``."""

    worker_id: str
    script: Script
    errors: list[BaseException] = field(default_factory=list)

    @property
    def served(self) -> list[str]:
        return self.script.served


class _Supervisor:
    """Runs ``WorkerService`` in a thread and restarts it after a ``SimulatedCrash``."""

    def __init__(self, settings: Settings, info: ModelInfo, status: WorkerStatus,
                 handle: RunningWorker) -> None:
        self.settings = settings
        self.info = info
        self.status = status
        self.handle = handle
        self.service: WorkerService | None = None
        self.service_type: type[WorkerService] = WorkerService
        self.shutdown = ShutdownSignal()  # shared by the restarts: a stop reaches them all
        tokenizer = Tokenizer.from_str(info.tokenizer_json.decode())
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        self.thread = threading.Thread(target=self._run, name=f"worker-{status.worker_id}",
                                       daemon=True)

    def _run(self) -> None:
        while not self.shutdown.is_requested:
            engine = ScriptedEngine(self.handle.script, self._decode,
                                    self.settings.max_batch_size)
            self.service = self.service_type(self.settings, engine, self.info,
                                             status=self.status, shutdown=self.shutdown)
            try:
                self.service.run()
                return
            except SimulatedCrash:
                continue  # the supervisor starts a fresh worker process
            except BaseException as exc:  # reported by running_worker at the end
                self.handle.errors.append(exc)
                return

    def stop(self) -> None:
        self.shutdown.request()
        self.shutdown.request()  # the second request: stop now, no drain
        self.thread.join(STOP_TIMEOUT_S)
        if self.thread.is_alive():
            raise RuntimeError(f"the worker did not stop within {STOP_TIMEOUT_S:.0f} s")


def register_worker(settings: Settings, info: ModelInfo, worker_id: str = "worker-idle",
                    *, is_warm: bool = True) -> None:
    """What a starting worker writes (model info, one heartbeat), without serving anything."""
    client = sync_client(settings)
    try:
        client.hset(Keys(settings.key_prefix).model_info(info.name), mapping=info.to_mapping())
        status = WorkerStatus(worker_id=worker_id, model=info.name, is_warm=is_warm,
                              state=STATE_READY if is_warm else "starting")
        _heartbeat(settings, status, client).beat()
    finally:
        client.close()


def _heartbeat(settings: Settings, status: WorkerStatus,
               client: redis.Redis | None = None) -> Heartbeat:
    return Heartbeat(client or sync_client(settings), Keys(settings.key_prefix), status,
                     settings.heartbeat_interval_s, settings.heartbeat_ttl_s)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, info: ModelInfo, *, worker_id: str = "worker-1",
                         reply: tuple[str, ...] | list[str] = DEFAULT_REPLY,
                         publish: bool = True) -> AsyncIterator[RunningWorker]:
    """A real worker serving ``info`` on ``settings``' Redis until the block ends.

    ``publish=False`` drops its pub/sub messages (the events still reach the job's list),
    as Redis does to a slow subscriber. Yields once the worker is ready and warm."""
    handle = RunningWorker(worker_id=worker_id, script=Script(reply=tuple(reply)))
    status = WorkerStatus(worker_id=worker_id, model=info.name)
    heartbeat = _heartbeat(settings, status)
    supervisor = _Supervisor(settings, info, status, handle)
    if not publish:
        supervisor.service_type = QuietWorkerService
    heartbeat.start()
    supervisor.thread.start()
    try:
        await _until(lambda: status.state == STATE_READY or bool(handle.errors))
        await asyncio.to_thread(heartbeat.beat)  # warm now, not at the next tick
        yield handle
    finally:
        await asyncio.to_thread(supervisor.stop)
        await asyncio.to_thread(heartbeat.stop)
    if handle.errors:
        raise handle.errors[0]


class QuietWorkerService(WorkerService):
    """A worker whose events reach the job's list but no pub/sub channel."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        flush = self.publisher.flush

        def flush_quietly(client: redis.Redis, watch: list[str]) -> Any:
            for writes in self.publisher.outbox.jobs.values():
                writes.job.reply_channel = ""  # stored in the job's list, published nowhere
            return flush(client, watch)

        self.publisher.flush = flush_quietly  # type: ignore[method-assign]


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the worker did not become ready in time")
        await asyncio.sleep(0.01)
