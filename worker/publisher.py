"""Turning engine outputs into wire events and storing them, one transaction per loop turn.

Everything a loop turn wants written (start records, events, text, final job state,
dead letters, acknowledgements) is collected in an ``Outbox`` in memory and written by
``flush`` in one ``MULTI``/``EXEC`` round trip, acks last, so a request is acknowledged
exactly when its result is stored. If Redis is unreachable the outbox is kept and the next
``flush`` writes it (events keep their order; delivery is at-least-once).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import redis

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

JOB_STATUS_BY_FINISH = {
    "stop": "succeeded",
    "length": "succeeded",
    "cancelled": "cancelled",
    "error": "failed",
    "timeout": "failed",
}

JobFields = dict[str, str | int | float]


class PublishObserver(Protocol):
    """Told of every request this worker ends and every entry it dead-letters."""

    def on_finished(self, request_id: str, finish_reason: str, *, num_output_tokens: int,
                    num_prompt_tokens: int) -> None: ...

    def on_dead_lettered(self) -> None: ...


@dataclass(slots=True)
class InFlight:
    """A request this worker took: where to ack it, where to publish, its event order."""

    id: str
    stream: str
    entry_id: bytes
    reply_channel: str
    num_prompt_tokens: int
    next_seq: int = 0
    is_abort_sent: bool = False

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq


@dataclass(slots=True)
class DeadLetter:
    fields: dict[bytes, bytes]  # the raw entry fields plus why it was rejected


@dataclass(slots=True)
class Outbox:
    """Writes waiting for the next flush."""

    starts: list[tuple[str, JobFields]] = field(default_factory=list)
    events: list[tuple[str, TokenEvent]] = field(default_factory=list)  # (channel, event)
    texts: dict[str, list[str]] = field(default_factory=dict)
    finishes: list[tuple[str, JobFields]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    acks: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.starts or self.events or self.texts or self.finishes
                    or self.dead_letters or self.acks)


# Append a job's events and text once: a transaction whose reply was lost (Redis went away
# right after EXEC) is sent again by the retry, and must not store its events twice. The
# event list's length is the next seq; a list already past this batch's first seq has it.
# A shorter list (Redis lost data) still gets the events. On a (re)start the text resets.
# KEYS: events list, text. ARGV: first seq, reset text (0/1), ttl, text, packed events...
APPEND_ONCE = """
if redis.call('LLEN', KEYS[1]) > tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '1' then redis.call('SET', KEYS[2], '', 'EX', ARGV[3]) end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 5))
if #ARGV[4] > 0 then redis.call('APPEND', KEYS[2], ARGV[4]) end
return 1
"""


def pack_event_batch(packed_events: list[bytes]) -> bytes:
    """The same bytes as ``shared.protocol.pack_events``, from events packed one by one."""
    header = bytes(msgpack.Packer().pack_array_header(len(packed_events)))
    return header + b"".join(packed_events)


class Publisher:
    def __init__(self, keys: Keys, model: str, worker_id: str, job_ttl_s: int,
                 stream_maxlen: int) -> None:
        self.keys = keys
        self.worker_id = worker_id
        self.job_ttl_s = job_ttl_s
        self.stream_maxlen = stream_maxlen
        self.dead_letter_stream = keys.dead_letter_stream(model)
        self.outbox = Outbox()
        self._append: Any = None  # the APPEND_ONCE script, registered on the first flush
        self.observer: PublishObserver | None = None  # metrics: every finish, dead letter

    # --- queueing writes ----------------------------------------------------------------

    def start(self, job: InFlight, *, is_restart: bool = False) -> None:
        """status -> running; a ``restart`` event first when another worker had it before."""
        if is_restart:
            self._event(job, EVENT_RESTART)
        self._event(job, EVENT_START, prompt_tokens=job.num_prompt_tokens)
        self.outbox.starts.append((job.id, {
            "status": "running", "started_at": time.time(), "worker": self.worker_id,
        }))

    def emit(self, job: InFlight, out: RequestOutput) -> None:
        """Events (and, when finished, the final job state and the ack) for one output."""
        if out.new_token_ids or out.text_delta:
            self._event(job, EVENT_TOKEN, text=out.text_delta, token_ids=list(out.new_token_ids),
                        completion_tokens=out.num_output_tokens)
            if out.text_delta:
                self.outbox.texts.setdefault(job.id, []).append(out.text_delta)
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
        fields: JobFields = {
            "status": JOB_STATUS_BY_FINISH.get(finish_reason, "failed"),
            "finished_at": time.time(),
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": num_output_tokens,
        }
        if error is not None:
            fields["error"] = error
        self.outbox.finishes.append((job.id, fields))
        if self.observer is not None:
            self.observer.on_finished(job.id, finish_reason, num_output_tokens=num_output_tokens,
                                      num_prompt_tokens=prompt_tokens)
        if ack:
            self.outbox.acks.append((job.stream, job.entry_id))

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
        self.outbox.acks.append((stream, entry_id))

    def _event(self, job: InFlight, kind: str, *, text: str = "",
               token_ids: list[int] | None = None, finish_reason: str | None = None,
               prompt_tokens: int = 0, completion_tokens: int = 0,
               error: str | None = None) -> None:
        event = TokenEvent(
            id=job.id, seq=job.take_seq(), type=kind, text=text, token_ids=token_ids or [],
            finish_reason=finish_reason, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, error=error,
        )
        self.outbox.events.append((job.reply_channel, event))

    # --- writing ------------------------------------------------------------------------

    def flush(self, client: redis.Redis, cancel_watch: list[str]) -> set[str]:
        """Write the outbox in one transaction; return the ids in ``cancel_watch`` whose
        cancel key is set (checked in the same round trip). Keeps the outbox on
        connection errors."""
        if self.outbox.is_empty and not cancel_watch:
            return set()
        if self._append is None:
            self._append = client.register_script(APPEND_ONCE)
        pipe = client.pipeline(transaction=True)
        self._write(pipe, self.outbox)
        if cancel_watch:
            pipe.mget([self.keys.cancel(job_id) for job_id in cancel_watch])
        results = pipe.execute(raise_on_error=False)
        self.outbox = Outbox()
        for result in results:
            if isinstance(result, Exception):
                logger.error("a result write failed: %s", result)
        flags = results[-1] if cancel_watch else []
        if isinstance(flags, Exception):
            return set()
        return {job_id for job_id, flag in zip(cancel_watch, flags, strict=True) if flag}

    def _write(self, pipe: redis.client.Pipeline, box: Outbox) -> None:
        ttl_s = self.job_ttl_s
        for job_id, fields in box.starts:
            pipe.hset(self.keys.job(job_id), mapping=fields)
            pipe.expire(self.keys.job(job_id), ttl_s)
        self._write_events(pipe, box)
        for job_id, _ in box.starts:
            pipe.expire(self.keys.job_events(job_id), ttl_s)
            pipe.expire(self.keys.job_text(job_id), ttl_s)
        for job_id, fields in box.finishes:
            pipe.hset(self.keys.job(job_id), mapping=fields)
            for key in (self.keys.job(job_id), self.keys.job_text(job_id),
                        self.keys.job_events(job_id)):
                pipe.expire(key, ttl_s)
        for dead in box.dead_letters:
            raw: dict[Any, Any] = dead.fields
            pipe.xadd(self.dead_letter_stream, raw, maxlen=self.stream_maxlen,
                      approximate=True)
        for stream, entry_id in box.acks:
            pipe.xack(stream, WORKER_GROUP, entry_id)

    def _write_events(self, pipe: redis.client.Pipeline, box: Outbox) -> None:
        by_job: dict[str, list[bytes]] = {}
        by_channel: dict[str, list[bytes]] = {}
        for channel, event in box.events:
            packed = pack(event)
            by_job.setdefault(event.id, []).append(packed)
            if channel:
                by_channel.setdefault(channel, []).append(packed)
        first_seq = {}
        for _, event in box.events:
            first_seq.setdefault(event.id, event.seq)
        restarted = {job_id for job_id, _ in box.starts}
        for job_id, packed_events in by_job.items():
            text = "".join(box.texts.get(job_id, ()))
            self._append(keys=[self.keys.job_events(job_id), self.keys.job_text(job_id)],
                         args=[first_seq[job_id], int(job_id in restarted), self.job_ttl_s,
                               text, *packed_events], client=pipe)
        for channel, packed_events in by_channel.items():
            pipe.publish(channel, pack_event_batch(packed_events))
