"""Workers follow the queue on one machine: ``tokenfleet up --workers auto``.

Every ``TICK_S`` (0.1 s) the autoscaler reads, for its model, the same queue depth the gateway's
backpressure uses (``shared.queue_depth``: undelivered + running, over both lanes) and the
heartbeats of its workers, and decides:

- **desired** = ``ceil(depth / TOKENFLEET_SCALE_TARGET_REQUESTS)``, kept within
  ``[min_workers, max_workers]`` (KEDA's ``lagCount``, Ray Serve's
  ``target_ongoing_requests``). A worker still starting counts as one: no double spawn
  while a cold start is under way.
- **scale up** at once: start ``desired - live`` workers.
- **scale down** only through idleness: a worker whose heartbeat says ready with nothing
  running or waiting, continuously for ``TOKENFLEET_SCALE_DOWN_IDLE_S``, is drained with
  SIGTERM (it stops reading, finishes what it holds, exits 0) while the fleet is above
  ``desired``. A busy worker is never signalled.
- **crash loop**: a worker that exits on its own (not drained) holds further starts back
  1, 2, 4, ... up to 60 s, until a worker reports ready again.
- **standby** (``TOKENFLEET_SCALE_STANDBY_WORKERS``, 0 by default): spares are started
  with ``TOKENFLEET_WORKER_STANDBY=true``; they load and warm the model and wait without
  reading the queue. A scale-up promotes spares first (SIGUSR1), then starts new workers,
  and a new spare replaces each promoted one. Spares hold memory, not CPU, and are not
  counted in ``[min_workers, max_workers]``.
- **bootstrap**: when no worker ever published the model's info (a fresh Redis), one
  worker is started whatever ``min_workers`` says, so gateways can tokenize and queue
  requests for it; it scales away like any other once idle.

Each decision goes to ``Keys.fleet_scaler`` (the dashboard's autoscaler column and the
``tokenfleet:autoscaler_desired_workers`` gauge). Workers are matched to heartbeats by pid
(a worker id is ``host-pid-random``). Stdlib + ``shared`` only: no torch, no FastAPI.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from shared.keys import Keys
from shared.queue_depth import parse_depths, queue_commands

logger = logging.getLogger("tokenfleet.autoscale")

TICK_S = 0.1  # a tick is two pipelined round trips (~8 commands)
CRASH_BACKOFF_S = 1.0  # after a worker dies on its own: 1, 2, 4, ... s before the next start
CRASH_BACKOFF_MAX_S = 60.0
SCALER_STATE_TTL_S = 30
STATE_READY = "ready"  # the worker heartbeat's state while it serves

# (name, standby) -> a started worker process; standby: TOKENFLEET_WORKER_STANDBY=true
StartWorker = Callable[[str, bool], subprocess.Popen[bytes]]


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    min_workers: int
    max_workers: int
    target_requests: int  # queued + running requests per worker
    idle_s: float  # idle this long -> drained (when above desired)
    standby: int = 0  # spares: started and loaded, promoted (SIGUSR1) on scale-up

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise ValueError("need 0 <= --min-workers <= --max-workers and --max-workers >= 1")
        if self.target_requests < 1:
            raise ValueError("the target of requests per worker must be at least 1")
        if self.standby < 0:
            raise ValueError("the number of standby workers must be >= 0")


def desired_workers(depth: int, policy: ScalePolicy) -> int:
    want = math.ceil(depth / policy.target_requests) if depth > 0 else 0
    return max(policy.min_workers, min(policy.max_workers, want))


def pid_of(worker_id: str) -> int | None:
    """The pid in a worker id ``<hostname>-<pid>-<random>`` (hostnames may hold dashes)."""
    parts = worker_id.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


@dataclass(slots=True)
class Heartbeat:
    state: str
    num_running: int
    num_waiting: int

    @property
    def is_idle(self) -> bool:
        return self.state == STATE_READY and self.num_running == 0 and self.num_waiting == 0


@dataclass(slots=True)
class ManagedWorker:
    name: str
    proc: subprocess.Popen[bytes]
    started_at: float  # unix
    idle_since: float | None = None  # monotonic
    drain_sent_at: float | None = None  # unix; set once SIGTERM was sent
    is_standby: bool = False  # a spare, not reading the queue until promoted
    promoted_at: float | None = None  # unix; when SIGUSR1 made a spare serve

    @property
    def is_draining(self) -> bool:
        return self.drain_sent_at is not None


@dataclass(slots=True)
class Decision:
    depth: int
    desired: int
    workers: int  # live, not draining (starting ones included)
    started: list[str] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    reason: str = ""


class Autoscaler:
    def __init__(self, client: redis.Redis, keys: Keys, model: str, policy: ScalePolicy,
                 start_worker: StartWorker, *, heartbeat_ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.keys = keys
        self.model = model
        self.policy = policy
        self.start_worker = start_worker
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.clock = clock
        self.workers: list[ManagedWorker] = []
        self.exited: list[tuple[ManagedWorker, int]] = []  # (worker, exit code), oldest first
        self._num_started = 0
        self._is_failing = False
        self._num_crashes = 0  # workers that died on their own since one was last ready
        self._hold_until = 0.0  # clock(): no start before this (crash backoff)
        self.last: Decision | None = None

    # --- one tick -----------------------------------------------------------------------

    def tick(self) -> Decision:
        self._reap()
        depth, is_known, beats = self._read()
        live = [w for w in self.workers if not w.is_draining and not w.is_standby]
        spares = [w for w in self.workers if not w.is_draining and w.is_standby]
        desired = desired_workers(depth, self.policy)
        reason = f"{depth} queued+running / {self.policy.target_requests} per worker"
        if not is_known and not live:
            desired, reason = max(desired, 1), "bootstrap: no worker published the model yet"
        self._track_idle(live, beats)
        decision = Decision(depth=depth, desired=desired, workers=len(live), reason=reason)
        if desired > len(live) and self.clock() < self._hold_until:
            decision.reason += (f"; starts held back {self._hold_until - self.clock():.1f} s "
                                f"after {self._num_crashes} crash(es)")
        elif desired > len(live):
            need = desired - len(live)
            # only spares that heartbeat: their SIGUSR1 handler is installed (before the
            # first beat); the default action of SIGUSR1 would kill a process still starting
            signalled = [w for w in spares if w.proc.pid in beats][:need]
            decision.promoted = [self._promote(w) for w in signalled]
            decision.started = [self._start().name
                                for _ in range(need - len(decision.promoted))]
        elif desired < len(live):
            decision.drained = self._drain_idle(live, len(live) - desired)
        num_spares = len(spares) - len(decision.promoted)
        if num_spares < self.policy.standby and self.clock() >= self._hold_until:
            decision.started += [self._start(standby=True).name
                                 for _ in range(self.policy.standby - num_spares)]
        if decision.started or decision.drained or decision.promoted:
            logger.info("%s: %d -> %d workers (%s)%s%s%s", self.model, len(live), desired,
                        reason, f"; promoted {', '.join(decision.promoted)}"
                        if decision.promoted else "",
                        f"; started {', '.join(decision.started)}"
                        if decision.started else "",
                        f"; draining idle {', '.join(decision.drained)}"
                        if decision.drained else "")
        self._publish(decision)
        self.last = decision
        return decision

    def tick_safely(self) -> None:
        """``tick``, with a Redis outage (or a failed process start) logged once and the
        fleet left as it is."""
        try:
            self.tick()
        except (redis.RedisError, OSError) as exc:  # Redis away, or a worker cannot start
            if not self._is_failing:
                logger.warning("autoscaler: %s; holding the fleet as is", exc)
            self._is_failing = True
            return
        if self._is_failing:
            logger.info("autoscaler: Redis answers again")
        self._is_failing = False

    def stop(self, timeout_s: float) -> None:
        """SIGTERM every worker (they drain), wait up to ``timeout_s``, then SIGKILL."""
        procs = [w.proc for w in self.workers]
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.terminate()
                worker.drain_sent_at = time.time()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    @property
    def num_live(self) -> int:
        return sum(1 for w in self.workers if w.proc.poll() is None)

    # --- helpers ------------------------------------------------------------------------

    def _read(self) -> tuple[int, bool, dict[int, Heartbeat]]:
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        queue_commands(pipe, self.keys, self.model)
        pipe.sismember(self.keys.models, self.model)
        pipe.zrangebyscore(self.keys.workers, now - self.heartbeat_ttl_s, "+inf")
        *queue_replies, is_known, ids = pipe.execute(raise_on_error=False)
        depth = sum(lane.depth for lane in parse_depths(self.model, queue_replies))
        ids = ids if isinstance(ids, list) else []
        pipe = self.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hmget(self.keys.worker(worker_id.decode()),
                       ["model", "state", "batch_size", "waiting"])
        beats: dict[int, Heartbeat] = {}
        for worker_id, (model, state, running, waiting) in zip(
                ids, pipe.execute() if ids else [], strict=True):
            pid = pid_of(worker_id.decode())
            if pid is None or model is None or model.decode() != self.model:
                continue
            beats[pid] = Heartbeat(state=(state or b"").decode(), num_running=int(running or 0),
                                   num_waiting=int(waiting or 0))
        return depth, bool(is_known is True or is_known == 1), beats

    def _track_idle(self, live: list[ManagedWorker], beats: dict[int, Heartbeat]) -> None:
        now = self.clock()
        for worker in live:
            beat = beats.get(worker.proc.pid)
            if beat is not None and beat.state == STATE_READY:
                self._num_crashes = 0  # a worker serves: the crash loop (if any) is over
            if beat is not None and beat.is_idle:
                worker.idle_since = worker.idle_since if worker.idle_since is not None else now
            else:
                worker.idle_since = None  # starting, busy, or not heard from: not idle

    def _drain_idle(self, live: list[ManagedWorker], surplus: int) -> list[str]:
        now = self.clock()
        idle = sorted((w for w in live if w.idle_since is not None
                       and now - w.idle_since >= self.policy.idle_s),
                      key=lambda w: w.idle_since or now)
        drained = []
        for worker in idle[:surplus]:
            worker.proc.terminate()
            worker.drain_sent_at = time.time()
            drained.append(worker.name)
        return drained

    def _start(self, *, standby: bool = False) -> ManagedWorker:
        self._num_started += 1
        name = f"{'spare' if standby else 'worker'}-{self._num_started}"
        worker = ManagedWorker(name=name, proc=self.start_worker(name, standby),
                               started_at=time.time(), is_standby=standby)
        self.workers.append(worker)
        return worker

    def _promote(self, worker: ManagedWorker) -> str:
        """SIGUSR1: the spare serves as soon as its model is loaded (at once if it is)."""
        worker.proc.send_signal(signal.SIGUSR1)
        worker.is_standby = False
        worker.promoted_at = time.time()
        return worker.name

    def _reap(self) -> None:
        for worker in [w for w in self.workers if w.proc.poll() is not None]:
            self.workers.remove(worker)
            code = worker.proc.returncode
            self.exited.append((worker, code))
            if worker.is_draining:  # we sent SIGTERM: a drain, or a stop while it started
                logger.info("%s drained and exited (code %s)", worker.name, code)
                continue
            self._num_crashes += 1
            delay = min(CRASH_BACKOFF_MAX_S, CRASH_BACKOFF_S * 2 ** (self._num_crashes - 1))
            self._hold_until = self.clock() + delay
            logger.warning("%s exited on its own with code %s; replaced (if the queue needs "
                           "it) in %.0f s", worker.name, code, delay)

    def _publish(self, decision: Decision) -> None:
        standby = sum(1 for w in self.workers if w.is_standby and not w.is_draining)
        state = {"desired": decision.desired, "workers": decision.workers, "standby": standby,
                 "depth": decision.depth, "reason": decision.reason, "at": time.time(),
                 "min": self.policy.min_workers, "max": self.policy.max_workers}
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.keys.fleet_scaler, self.model, json.dumps(state))
            pipe.expire(self.keys.fleet_scaler, SCALER_STATE_TTL_S)  # gone with the scaler
            pipe.execute()
        except redis.RedisError as exc:
            logger.debug("could not publish the scaling decision: %s", exc)


def run(scaler: Autoscaler, should_stop: Callable[[], bool], tick_s: float = TICK_S) -> None:
    """Tick until ``should_stop()`` (a thread's loop; ``tokenfleet up`` ticks from its
    supervisor loop instead)."""
    while not should_stop():
        scaler.tick_safely()
        time.sleep(tick_s)
