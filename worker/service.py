"""The worker's queue loop: read requests, feed the engine, publish, ack (arq's shape).

``WorkerService.run`` repeats ``poll_once`` until told to stop; each turn is:
1. maintenance every few seconds: keep our in-flight entries fresh, claim stalled ones;
2. read: an idle engine blocks for the first request, then collects more for
   ``coalesce_ms`` (the coalescing window) so they start in one batch; a busy engine does
   one non-blocking read per step, only when it has free slots;
3. admit the entries (dead-letter / skip / ``engine.add_request``);
4. one ``engine.step()``;
5. one transaction: publish events, store text and results, XACK finished requests, and
   read the cancel flags of running requests (aborted before the next step).

Per step that is at most two round trips (the read and the transaction). Every write for a
request is fenced by its attempt (``shared.job_record``): when the transaction or the touch
says another worker now owns a request, it is aborted here and written no more. Redis
errors (down, OOM, READONLY, MISCONF) back off exponentially and keep all engine state;
SIGTERM/SIGINT stop reading and let the engine finish for up to ``drain_timeout_s`` (a
second signal stops at once).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from types import FrameType

import redis

from shared.keys import Keys
from shared.model_info import ModelInfo
from shared.redis_conn import RedisRefusal, refusal, sync_client
from shared.settings import Settings
from worker.engine.types import Engine
from worker.heartbeat import STATE_DRAINING, STATE_READY, WorkerStatus
from worker.intake import Intake, IntakePolicy
from worker.metrics import WorkerMetrics
from worker.publisher import FlushResult, InFlight, Publisher
from worker.reader import StreamEntry, StreamReader
from worker.reclaimer import Reclaimer, Toucher

logger = logging.getLogger(__name__)

IDLE_BLOCK_MS = 200  # longest blocking read: how fast an idle worker notices a signal
CANCEL_CHECK_INTERVAL_S = 0.05
MIN_MAINTENANCE_INTERVAL_S = 0.1
MAX_MAINTENANCE_INTERVAL_S = 5.0
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0
REDIS_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError)
# Replies meaning our streams/groups are gone (Redis restarted empty, FLUSHALL): set up again.
GROUPS_LOST_ERRORS = ("NOGROUP", "UNBLOCKED")


class ShutdownSignal:
    """Set by SIGTERM/SIGINT (or ``request()`` from a test): the first asks for a drain,
    the second for an immediate stop."""

    def __init__(self) -> None:
        self.num_requests = 0

    @property
    def is_requested(self) -> bool:
        return self.num_requests > 0

    @property
    def is_forced(self) -> bool:
        return self.num_requests > 1

    def request(self) -> None:
        self.num_requests += 1

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (main thread only)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.request()
        what = "draining" if not self.is_forced else "stopping now"
        logger.info("got %s: %s", signal.Signals(signum).name, what)


@dataclass(slots=True)
class Backoff:
    delay_s: float = FIRST_BACKOFF_S

    def next_delay_s(self) -> float:
        delay = self.delay_s
        self.delay_s = min(MAX_BACKOFF_S, self.delay_s * 2)
        return delay

    def reset(self) -> None:
        self.delay_s = FIRST_BACKOFF_S


def short_reason(exc: redis.RedisError) -> str:
    """Redis's own words, without redis-py's echo of a pipeline's (binary) command."""
    message = str(exc)
    _, marker, reason = message.partition("caused error: ")
    return (reason if marker else message)[:200]


def maintenance_interval_s(claim_idle_ms: int) -> float:
    """Touch/reclaim often enough that a live worker's entries never look stalled."""
    interval_s = claim_idle_ms / 1000 / 3
    return min(MAX_MAINTENANCE_INTERVAL_S, max(MIN_MAINTENANCE_INTERVAL_S, interval_s))


class WorkerService:
    def __init__(self, settings: Settings, engine: Engine, model_info: ModelInfo, *,
                 status: WorkerStatus, client: redis.Redis | None = None,
                 shutdown: ShutdownSignal | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.model_info = model_info
        self.status = status
        self.client = client or sync_client(settings)
        self.shutdown = shutdown or ShutdownSignal()
        self.keys = Keys(settings.key_prefix)
        worker_id = status.worker_id
        self.reader = StreamReader(self.client, self.keys, model_info.name, worker_id,
                                   reserve=settings.interactive_reserve_rows)
        self.reclaimer = Reclaimer(self.client, self.keys, self.reader.streams, worker_id,
                                   settings.claim_idle_ms)
        self.publisher = Publisher(self.keys, model_info.name, worker_id,
                                   job_ttl_s=settings.job_ttl_s,
                                   events_ttl_s=settings.events_ttl_s,
                                   stream_maxlen=settings.stream_maxlen)
        self.jobs: dict[str, InFlight] = {}
        self.lost: set[str] = set()  # aborted after another worker took them; not written
        self.intake = Intake(self.client, self.keys, engine, self.publisher, self.jobs,
                             IntakePolicy(settings.max_deliveries, settings.request_timeout_s,
                                          settings.job_ttl_s))
        self.inbox: list[StreamEntry] = []  # delivered to us, not yet admitted
        self._refusal: RedisRefusal | None = None  # what Redis is refusing, while it does
        self.metrics = metrics or WorkerMetrics(model_info.name, worker_id)
        self.publisher.observer = self.metrics
        self.intake.on_admitted = self.metrics.on_admitted_request
        self._needs_setup = True
        self._drain_deadline: float | None = None
        self._next_maintenance_at = 0.0
        self._next_cancel_check_at = 0.0
        self._maintenance_interval_s = maintenance_interval_s(settings.claim_idle_ms)
        self.toucher = Toucher(self.reclaimer, self._maintenance_interval_s,
                               settings.stall_timeout_s)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a shutdown signal and the drain that follows; returns the exit code."""
        backoff = Backoff()
        self.toucher.start()
        try:
            while not self._should_exit():
                try:
                    self.poll_once()
                    backoff.reset()
                    self._on_redis_ok()
                except (*REDIS_DOWN_ERRORS, redis.ResponseError) as exc:
                    self._on_redis_error(exc, backoff.next_delay_s())
        finally:
            self._close()
        return 0

    def request_stop(self) -> None:
        self.shutdown.request()

    def poll_once(self) -> None:
        self.toucher.mark_progress()
        if self._needs_setup:
            self._setup()
        if not self.publisher.outbox.is_empty:
            self._flush()  # writes left over from a Redis error go first
        if time.monotonic() >= self._next_maintenance_at:
            self._maintain()
        if not self.shutdown.is_requested and not self.inbox:
            self._read()
        if self.inbox:
            self._publish_in_flight()
            self.intake.admit(self.inbox)
            self.inbox = []
        self._publish_in_flight()  # before the step: it may outlast the claim idle time
        if self.engine.has_unfinished():
            self._step()
        self._flush()

    # --- one-job helpers ----------------------------------------------------------------

    def _publish_in_flight(self) -> None:
        """Tell the toucher every entry we hold: admitted or still in the inbox."""
        held = [(job.stream, job.entry_id) for job in self.jobs.values()]
        held.extend((entry.stream, entry.entry_id) for entry in self.inbox)
        self.toucher.set_in_flight(held)

    def _setup(self) -> None:
        self.reader.ensure_groups()
        self.client.hset(self.keys.model_info(self.model_info.name),
                         mapping=self.model_info.to_mapping())
        self.client.sadd(self.keys.models, self.model_info.name)
        self.status.is_warm = True
        if not self.shutdown.is_requested:
            self.status.state = STATE_READY
        self._needs_setup = False
        self.metrics.on_serving()
        logger.info("serving %s on %s as consumer %s", self.model_info.name,
                    ", ".join(self.reader.streams), self.status.worker_id)

    def _read(self) -> None:
        """Fill the inbox: non-blocking when busy, a coalescing window when idle."""
        num_free = self.engine.num_free_slots()
        if num_free <= 0:
            return
        if self.engine.has_unfinished():
            self.inbox.extend(self.reader.read(num_free))
        else:
            self._collect_batch(min(num_free, self.settings.max_batch_size))

    def _collect_batch(self, capacity: int) -> None:
        """Idle engine: wait for the first entry, then gather more for ``coalesce_ms``.

        Entries go to the inbox as they arrive, so a Redis error mid-window loses none."""
        inbox = self.inbox
        inbox.extend(self.reader.read(capacity) or self.reader.wait(IDLE_BLOCK_MS))
        if not inbox:  # idle for IDLE_BLOCK_MS: the KV buffers kept between batches go
            self.engine.release_idle_memory()
            return
        window_end = time.monotonic() + self.settings.coalesce_ms / 1000
        while len(inbox) < capacity and not self.shutdown.is_requested:
            left_ms = (window_end - time.monotonic()) * 1000
            if left_ms <= 0:
                break
            more = self.reader.read(capacity - len(inbox))
            inbox.extend(more or self.reader.wait(min(math.ceil(left_ms), IDLE_BLOCK_MS)))

    def _step(self) -> None:
        started = time.perf_counter()
        outputs = self.engine.step()
        # before the outputs are emitted: a finish ends the request's timings
        self.metrics.on_step(outputs, self.engine.stats(), time.perf_counter() - started)
        for out in outputs:
            job = self.jobs.get(out.id)
            if job is None:
                if out.id in self.lost:
                    if out.finished:
                        self.lost.discard(out.id)
                else:
                    logger.warning("engine reported unknown request %s", out.id)
                continue
            self.publisher.emit(job, out)
            if out.finished:
                del self.jobs[out.id]
        self.status.update(self.engine.stats())

    def _flush(self) -> None:
        """Write the outbox; abort the running requests whose cancel key is set."""
        watch: list[str] = []
        now = time.monotonic()
        if self.jobs and now >= self._next_cancel_check_at:
            watch = [job.id for job in self.jobs.values() if not job.is_abort_sent]
            self._next_cancel_check_at = now + CANCEL_CHECK_INTERVAL_S
        result: FlushResult = self.publisher.flush(self.client, watch)
        for job_id, attempt in result.lost:
            job = self.jobs.get(job_id)
            if job is not None and job.attempt == attempt:
                self._drop_lost(job)
        for job_id in result.cancelled:
            job = self.jobs.get(job_id)
            if job is not None and not job.is_abort_sent:
                logger.info("cancelling request %s", job_id)
                self.engine.abort_request(job_id)
                job.is_abort_sent = True

    def _drop_lost(self, job: InFlight) -> None:
        """Another worker owns the request now: stop generating it and write nothing more
        (its writes would be refused anyway); its entry is not ours to ack or touch."""
        logger.warning("request %s (attempt %d) was taken over by another worker; "
                       "aborting our copy", job.id, job.attempt)
        del self.jobs[job.id]
        self.metrics.forget(job.id)  # its finish is the other worker's to count
        self.lost.add(job.id)
        self.engine.abort_request(job.id)

    def _maintain(self) -> None:
        self._next_maintenance_at = time.monotonic() + self._maintenance_interval_s
        lost = self.toucher.take_lost()  # touched by its thread, also during long steps
        lost |= self.reclaimer.touch((job.stream, job.entry_id) for job in self.jobs.values())
        for job in [job for job in self.jobs.values() if (job.stream, job.entry_id) in lost]:
            self._drop_lost(job)
        self.reclaimer.tidy()
        stats = self.engine.stats()  # idle too: e.g. the compiled step attached meanwhile
        self.status.update(stats)
        self.metrics.on_engine_stats(stats)
        if not self.shutdown.is_requested and not self.inbox:
            self.inbox = self.reclaimer.claim(self.engine.num_free_slots())
            self.metrics.on_reclaimed(len(self.inbox))

    # --- stopping and errors ------------------------------------------------------------

    def _should_exit(self) -> bool:
        if self.shutdown.is_forced:
            return True
        if not self.shutdown.is_requested:
            return False
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            self.status.state = STATE_DRAINING
            logger.info("draining: %d request(s) in flight, up to %.0f s", len(self.jobs),
                        self.settings.drain_timeout_s)
        is_done = not self.engine.has_unfinished() and self.publisher.outbox.is_empty
        if is_done and not self.inbox:
            return True
        if time.monotonic() >= self._drain_deadline:
            logger.warning("drain timeout: leaving %d request(s) for other workers",
                           len(self.jobs))
            return True
        return False

    def _on_redis_error(self, exc: redis.RedisError, delay_s: float) -> None:
        """Back off and retry an outage; one log line when it starts, one when it ends."""
        kind = refusal(exc)
        if kind is None:
            if not any(marker in str(exc) for marker in GROUPS_LOST_ERRORS):
                raise exc  # a bug, not an outage
            self._needs_setup = True  # Redis may have come back empty: groups, model info
            kind = RedisRefusal.DOWN
        elif kind is RedisRefusal.DOWN:
            self._needs_setup = True
        elif kind is RedisRefusal.READONLY:
            self.client.connection_pool.disconnect()  # reconnect: maybe to the new primary
        if kind is not self._refusal:
            logger.warning("Redis %s (%s); backing off and retrying, up to %.1f s apart",
                           kind.value, short_reason(exc), MAX_BACKOFF_S)
            self._refusal = kind
        else:
            logger.debug("Redis still %s: %s", kind.value, short_reason(exc))
        time.sleep(delay_s)

    def _on_redis_ok(self) -> None:
        if self._refusal is not None:
            logger.info("Redis is serving us again (after: %s)", self._refusal.value)
            self._refusal = None

    def _close(self) -> None:
        """Best effort: store what is finished, hand back what is not."""
        self.toucher.stop()
        try:
            if not self.publisher.outbox.is_empty:
                self.publisher.flush(self.client, [])
            if self.jobs:
                self.reclaimer.release((job.stream, job.entry_id) for job in self.jobs.values())
        except redis.RedisError as exc:
            logger.warning("could not finish cleanly: %s", exc)
        logger.info("stopped (%d request(s) left unfinished)", len(self.jobs))
