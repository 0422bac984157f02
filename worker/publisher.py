"""Turning engine outputs into wire events and storing them, one transaction per loop turn.

Everything a loop turn wants written (start records, events, text, final job state,
dead letters, acknowledgements) is collected in an ``Outbox`` in memory and written by
``flush`` in one ``MULTI``/``EXEC`` round trip. A job's writes (events, text, record, the
ack of its entry) go through ``WRITE_JOBS_LUA`` (one call for every job of the flush) and
their live events through ``PUBLISH_JOB_EVENTS_LUA`` (one message per gateway channel),
both fenced by each job's
attempt: a worker that lost a request to another one writes nothing more for it, and
``flush`` reports the job as lost. If Redis is unreachable or refuses writes the outbox is
kept and the next ``flush`` writes it (events keep their order; delivery is at-least-once).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import redis

from shared.job_record import (
    PUBLISH_JOB_EVENTS_LUA,
    STATUS_RUNNING,
    WRITE_JOBS_LUA,
    WRITE_NO_ACK,
    JobRecord,
    status_for_finish,
)
from shared.keys import WORKER_GROUP, Keys
from shared.protocol import (
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_RESTART,
    EVENT_START,
    EVENT_TOKEN,
    TokenEvent,
    pack,
)
from worker.engine.types import RequestOutput

logger = logging.getLogger(__name__)

WRITE_FENCED = -1  # a job's reply in WRITE_JOBS_LUA when another attempt owns the job


class PublishObserver(Protocol):
    """Told of every request this worker ends and every entry it dead-letters."""

    def on_finished(self, request_id: str, finish_reason: str, *, num_output_tokens: int,
                    num_prompt_tokens: int) -> None: ...

    def on_dead_lettered(self) -> None: ...


@dataclass(slots=True)
class InFlight:
    """A request this worker took: its attempt, where to ack it, where to publish, its
    event order."""

    id: str
    stream: str
    entry_id: bytes
    reply_channel: str
    num_prompt_tokens: int
    attempt: int = 0  # from BEGIN_ATTEMPT_LUA; 0: never begun (a salvaged malformed entry)
    next_seq: int = 0
    is_abort_sent: bool = False

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq


@dataclass(slots=True)
class JobWrites:
    """What the next flush writes for one attempt of one job."""

    job: InFlight
    events: list[TokenEvent] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    is_start: bool = False
    is_finish: bool = False
    is_ack: bool = False


@dataclass(slots=True)
class DeadLetter:
    fields: dict[bytes, bytes]  # the raw entry fields plus why it was rejected


@dataclass(slots=True)
class Outbox:
    """Writes waiting for the next flush."""

    jobs: dict[tuple[str, int], JobWrites] = field(default_factory=dict)  # (id, attempt)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    acks: list[tuple[str, bytes]] = field(default_factory=list)  # entries no job owns

    @property
    def is_empty(self) -> bool:
        return not (self.jobs or self.dead_letters or self.acks)

    def writes(self, job: InFlight) -> JobWrites:
        key = (job.id, job.attempt)
        writes = self.jobs.get(key)
        if writes is None:
            writes = self.jobs[key] = JobWrites(job)
        return writes


@dataclass(slots=True)
class FlushResult:
    cancelled: set[str] = field(default_factory=set)  # cancel flag set (of the watched ids)
    lost: set[tuple[str, int]] = field(default_factory=set)  # (id, attempt) fenced off


def pack_event_batch(packed_events: list[bytes]) -> bytes:
    """The same bytes as ``shared.protocol.pack_events``, from events packed one by one."""
    header = bytes(msgpack.Packer().pack_array_header(len(packed_events)))
    return header + b"".join(packed_events)


class Publisher:
    def __init__(self, keys: Keys, model: str, worker_id: str, *, job_ttl_s: int,
                 events_ttl_s: int, stream_maxlen: int) -> None:
        self.keys = keys
        self.worker_id = worker_id
        self.job_ttl_s = job_ttl_s
        self.events_ttl_s = events_ttl_s
        self.stream_maxlen = stream_maxlen
        self.dead_letter_stream = keys.dead_letter_stream(model)
        self.outbox = Outbox()
        self.observer: PublishObserver | None = None  # metrics: every finish, dead letter

    # --- queueing writes ----------------------------------------------------------------

    def start(self, job: InFlight, *, is_restart: bool = False) -> None:
        """status -> running; a ``restart`` event first when an earlier attempt wrote any."""
        if is_restart:
            self._event(job, EVENT_RESTART)
        self._event(job, EVENT_START, prompt_tokens=job.num_prompt_tokens)
        writes = self.outbox.writes(job)
        writes.is_start = True
        self._record(writes, JobRecord(status=STATUS_RUNNING, started_at=time.time(),
                                       worker=self.worker_id))

    def emit(self, job: InFlight, out: RequestOutput) -> None:
        """Events (and, when finished, the final job state and the ack) for one output."""
        if out.new_token_ids or out.text_delta or out.choice_finish_reason:
            self._event(job, EVENT_TOKEN, text=out.text_delta, token_ids=list(out.new_token_ids),
                        completion_tokens=out.num_output_tokens, logprobs=out.logprobs,
                        index=out.index, finish_reason=out.choice_finish_reason)
            if out.text_delta and out.index == 0:  # n > 1: the job's text is choice 0's
                self.outbox.writes(job).text.append(out.text_delta)
        if out.first_token:
            self._record(self.outbox.writes(job), JobRecord(first_token_at=time.time()))
        if not out.finished:
            return
        reason = out.finish_reason or "stop"
        error = out.error or ("engine error" if reason == "error" else None)
        self.finish(job, reason, error=error, num_output_tokens=out.num_output_tokens,
                    num_prompt_tokens=out.num_prompt_tokens or job.num_prompt_tokens)

    def finish(self, job: InFlight, finish_reason: str, *, error: str | None = None,
               num_prompt_tokens: int | None = None, num_output_tokens: int = 0,
               ack: bool = True) -> None:
        """The terminal event, the final job state and (unless ``ack`` is off) the ack.

        ``error`` with finish reason "error" or "timeout" makes an ``error`` event; anything
        else ends with ``done``."""
        prompt_tokens = job.num_prompt_tokens if num_prompt_tokens is None else num_prompt_tokens
        is_error = error is not None and finish_reason in ("error", "timeout")
        self._event(job, EVENT_ERROR if is_error else EVENT_DONE, finish_reason=finish_reason,
                    prompt_tokens=prompt_tokens, completion_tokens=num_output_tokens, error=error)
        writes = self.outbox.writes(job)
        writes.is_finish = True
        writes.is_ack = ack
        self._record(writes, JobRecord(
            status=status_for_finish(finish_reason), finished_at=time.time(),
            finish_reason=finish_reason, prompt_tokens=prompt_tokens,
            completion_tokens=num_output_tokens, error=error))
        if self.observer is not None:
            self.observer.on_finished(job.id, finish_reason, num_output_tokens=num_output_tokens,
                                      num_prompt_tokens=prompt_tokens)

    def dead_letter(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes],
                    reason: str) -> None:
        """Park an entry we cannot serve in the dead-letter stream, and ack it."""
        extra = {b"reason": reason.encode(), b"source_stream": stream.encode(),
                 b"source_id": entry_id}
        self.outbox.dead_letters.append(DeadLetter({**fields, **extra}))
        self.outbox.acks.append((stream, entry_id))
        if self.observer is not None:
            self.observer.on_dead_lettered()

    def ack(self, stream: str, entry_id: bytes) -> None:
        """Acknowledge an entry no job of ours owns (a duplicate copy)."""
        self.outbox.acks.append((stream, entry_id))

    def _event(self, job: InFlight, kind: str, *, text: str = "",
               token_ids: list[int] | None = None, finish_reason: str | None = None,
               prompt_tokens: int = 0, completion_tokens: int = 0,
               error: str | None = None, logprobs: list[list[Any]] | None = None,
               index: int = 0) -> None:
        event = TokenEvent(
            id=job.id, seq=job.take_seq(), type=kind, text=text, token_ids=token_ids or [],
            finish_reason=finish_reason, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, error=error, logprobs=logprobs or [],
            index=index,
        )
        self.outbox.writes(job).events.append(event)

    @staticmethod
    def _record(writes: JobWrites, update: JobRecord) -> None:
        writes.fields.update(update.to_mapping())

    # --- writing ------------------------------------------------------------------------

    def flush(self, client: redis.Redis, cancel_watch: list[str]) -> FlushResult:
        """Write the outbox in one transaction; report the ids in ``cancel_watch`` whose
        cancel key is set (read in the same round trip) and the jobs found lost. Keeps the
        outbox when the transaction is not run (connection errors, OOM, READONLY...).

        The scripts go as ``EVAL`` with their source, not ``EVALSHA``: redis-py runs a
        pipeline's registered scripts by first asking ``SCRIPT EXISTS`` in a round trip of
        its own on every execute (a third of a busy worker's flush time, profiled), and an
        ``EVALSHA`` that meets ``NOSCRIPT`` (Redis restarted, ``SCRIPT FLUSH``) inside
        ``MULTI`` fails alone while the transaction's other commands run: half a write.
        Redis hashes the ~3 KB source and runs its cached compiled script."""
        if self.outbox.is_empty and not cancel_watch:
            return FlushResult()
        box = self.outbox
        pipe = client.pipeline(transaction=True)
        packed = self._write_jobs(pipe, box)
        self._publish(pipe, box, packed)
        self._write_plain(pipe, box)
        if cancel_watch:
            pipe.mget([self.keys.cancel(job_id) for job_id in cancel_watch])
        results = pipe.execute(raise_on_error=False)
        self.outbox = Outbox()
        return self._result(box, results, cancel_watch)

    def _write_jobs(self, pipe: redis.client.Pipeline,
                    box: Outbox) -> dict[tuple[str, int], list[bytes]]:
        """One ``WRITE_JOBS_LUA`` call for every job in the outbox (its reply is the first
        of the transaction's when there are jobs)."""
        packed_by_job: dict[tuple[str, int], list[bytes]] = {}
        keys: list[str] = []
        args: list[Any] = []
        for key, writes in box.jobs.items():
            job = writes.job
            packed = packed_by_job[key] = [pack(event) for event in writes.events]
            first_seq = writes.events[0].seq if writes.events else job.next_seq
            items = [part for pair in writes.fields.items() for part in pair]
            ack_id = job.entry_id if writes.is_ack else WRITE_NO_ACK
            keys += [self.keys.job(job.id), self.keys.job_events(job.id),
                     self.keys.job_text(job.id), self.keys.cancel(job.id), job.stream,
                     self.keys.webhook_events]
            args += [10 + len(items) + len(packed), job.attempt, first_seq,
                     int(writes.is_start), int(writes.is_finish), self.job_ttl_s,
                     self.events_ttl_s, WORKER_GROUP, ack_id, "".join(writes.text), len(items),
                     *items, *packed]
        if keys:
            pipe.eval(WRITE_JOBS_LUA, len(keys), *keys, *args)
        return packed_by_job

    def _publish(self, pipe: redis.client.Pipeline, box: Outbox,
                 packed_by_job: dict[tuple[str, int], list[bytes]]) -> None:
        by_channel: dict[str, tuple[list[str], list[Any]]] = {}
        for key, writes in box.jobs.items():
            channel = writes.job.reply_channel
            packed = packed_by_job[key]
            if not channel or not packed:
                continue
            keys, args = by_channel.setdefault(channel, ([], [channel]))
            keys.append(self.keys.job(writes.job.id))
            args.extend([writes.job.attempt, len(packed), *packed])
        for keys, args in by_channel.values():
            pipe.eval(PUBLISH_JOB_EVENTS_LUA, len(keys), *keys, *args)

    def _write_plain(self, pipe: redis.client.Pipeline, box: Outbox) -> None:
        for dead in box.dead_letters:
            raw: dict[Any, Any] = dead.fields
            pipe.xadd(self.dead_letter_stream, raw, maxlen=self.stream_maxlen,
                      approximate=True)
        for stream, entry_id in box.acks:
            pipe.xack(stream, WORKER_GROUP, entry_id)

    @staticmethod
    def _result(box: Outbox, results: list[Any], cancel_watch: list[str]) -> FlushResult:
        result = FlushResult()
        replies = results[0] if box.jobs else []
        if isinstance(replies, list):
            for writes, reply in zip(box.jobs.values(), replies, strict=False):
                if reply == WRITE_FENCED:
                    result.lost.add((writes.job.id, writes.job.attempt))
        for reply in results:
            if isinstance(reply, Exception):
                logger.error("a result write failed: %s", reply)
        flags = results[-1] if cancel_watch else []
        if not isinstance(flags, Exception):
            result.cancelled = {job_id for job_id, flag in zip(cancel_watch, flags, strict=True)
                                if flag}
        return result
