"""A job's events as one async iterator, whether they arrive live or are read back.

The job's event list (``Keys.job_events``) holds its events in ``seq`` order, so the event
with sequence number ``seq`` is at list index ``seq``. ``seq`` increases over the job's whole
life (across retries); events are deduplicated by it.

Live: from the request's ``Mailbox``. An event whose ``seq`` skips ahead (pub/sub lost a
batch: a reconnect, or Redis dropped a slow subscriber) is preceded by the missing events,
read from the list by index (the worker stores events before it publishes them, in the
same transaction). If nothing arrives for ``IDLE_CHECK_S`` the job hash is checked: when
the job is over (a lost last message, a cancel while queued) the reader switches to the
replay path; when it is still queued past its deadline (plus ``QUEUE_TIMEOUT_GRACE_S``, for
a worker to report it first: no worker read it), the reader cancels it and ends with a
queue-timeout error event.

Replay: ``LRANGE`` the event list from the next ``seq``, every ``POLL_MIN_S`` to
``POLL_MAX_S``, until a terminal event or a terminal job status. A finished job whose event
list is gone (compacted after its replay window) is read from its text and hash: the text
the reader has not yet given as one token event (after a ``restart`` event when the reader
cannot know what its client already has), then a terminal event made from the hash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.events import Mailbox
from shared.errors import ProtocolError
from shared.job_record import STATUS_QUEUED, TERMINAL_STATUSES, int_field, str_field
from shared.keys import Keys
from shared.protocol import (
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_RESTART,
    EVENT_TOKEN,
    TokenEvent,
    unpack_event,
)

logger = logging.getLogger("tokenfleet.gateway")

IDLE_CHECK_S = 2.0
POLL_MIN_S = 0.02
POLL_MAX_S = 0.05
QUEUE_TIMEOUT_GRACE_S = 5.0  # past a queued request's deadline, let a worker report it first
QUEUE_TIMEOUT_REASON = "timeout"  # the finish_reason of a request that timed out in the queue
TIMED_OUT_IN_QUEUE = "timed out in queue"  # the error the worker writes too (worker.intake)

# Give up on a request still queued past its deadline: cancel it (a worker that reads it,
# or took it a moment ago, drops it), so it never runs after the client was told it timed
# out. KEYS: job hash, cancel flag. ARGV: now.
_EXPIRE_QUEUED_LUA = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local ttl = redis.call('TTL', KEYS[1])
if ttl < 1 then ttl = 86400 end
redis.call('SET', KEYS[2], '1', 'EX', ttl)
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1],
           'finish_reason', 'timeout', 'error', 'timed out in queue')
return 1
"""


@dataclass(slots=True)
class _Cursor:
    """What a reader has given so far: the last ``seq``, and the text since the last
    restart (``None`` when unknown: a reader resumed after an event it did not see)."""

    last_seq: int
    text: list[str] | None

    def accept(self, event: TokenEvent) -> bool:
        """Record ``event``; False for a duplicate (already given)."""
        if event.seq <= self.last_seq:
            return False
        self.last_seq = event.seq
        if event.type == EVENT_RESTART:
            self.text = []
        elif event.type == EVENT_TOKEN and self.text is not None:
            self.text.append(event.text)
        return True


async def job_events(redis: aioredis.Redis, keys: Keys, job_id: str,
                     mailbox: Mailbox | None = None, *, after_seq: int = -1,
                     deadline: float | None = None) -> AsyncGenerator[TokenEvent, None]:
    """The job's events after ``after_seq`` (all by default), ending with exactly one
    terminal event. ``deadline`` (unix s): how long a live request may stay queued."""
    cursor = _Cursor(after_seq, [] if after_seq < 0 else None)
    if mailbox is not None:
        async for event in _live(redis, keys, job_id, mailbox, cursor, deadline):
            yield event
            if event.is_terminal:
                return
    async for event in _replay(redis, keys, job_id, cursor):
        yield event


async def _live(redis: aioredis.Redis, keys: Keys, job_id: str, mailbox: Mailbox,
                cursor: _Cursor, deadline: float | None) -> AsyncGenerator[TokenEvent, None]:
    """Events from the mailbox, gaps filled from the list; ends when the job is over."""
    while True:
        event = await mailbox.get(IDLE_CHECK_S)
        if event is None:
            status = await _status(redis, keys, job_id)
            if status is None or status in TERMINAL_STATUSES:
                return  # finished (or expired) without us hearing it: read it back
            if status == STATUS_QUEUED and await _expire_if_late(redis, keys, job_id, deadline):
                yield TokenEvent(id=job_id, seq=cursor.last_seq + 1, type=EVENT_ERROR,
                                 finish_reason=QUEUE_TIMEOUT_REASON, error=TIMED_OUT_IN_QUEUE)
                return
            continue
        if event.seq > cursor.last_seq + 1:
            async for missed in _fill_gap(redis, keys, job_id, cursor, event.seq):
                yield missed
        if cursor.accept(event):
            yield event
            if event.is_terminal:
                return


async def _fill_gap(redis: aioredis.Redis, keys: Keys, job_id: str, cursor: _Cursor,
                    seq: int) -> AsyncGenerator[TokenEvent, None]:
    """The stored events between the last one given and ``seq`` (exclusive)."""
    first = cursor.last_seq + 1
    raw_events = await redis.lrange(keys.job_events(job_id), first, seq - 1)
    for event in _decode(job_id, raw_events):
        if event is not None and event.seq < seq and cursor.accept(event):
            yield event
    if cursor.last_seq != seq - 1:
        logger.warning("job %s: events %d..%d were lost on the way and are not stored",
                       job_id, cursor.last_seq + 1, seq - 1)


async def _status(redis: aioredis.Redis, keys: Keys, job_id: str) -> str | None:
    raw = await redis.hget(keys.job(job_id), "status")
    return None if raw is None else raw.decode()


async def _expire_if_late(redis: aioredis.Redis, keys: Keys, job_id: str,
                          deadline: float | None) -> bool:
    """True when the job was still queued past ``deadline`` + grace and is now cancelled."""
    if deadline is None or time.time() <= deadline + QUEUE_TIMEOUT_GRACE_S:
        return False
    expire = redis.register_script(_EXPIRE_QUEUED_LUA)
    if not await expire(keys=[keys.job(job_id), keys.cancel(job_id)], args=[repr(time.time())]):
        return False  # a worker took it meanwhile
    logger.info("job %s: still queued past its deadline; cancelled as timed out", job_id)
    return True


async def _replay(redis: aioredis.Redis, keys: Keys, job_id: str,
                  cursor: _Cursor) -> AsyncGenerator[TokenEvent, None]:
    index = cursor.last_seq + 1  # the list holds the event of sequence number n at index n
    delay = POLL_MIN_S
    while True:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.job(job_id), "status")  # status first: then the list is complete
            pipe.lrange(keys.job_events(job_id), index, -1)
            pipe.exists(keys.job_events(job_id))
            status, raw_events, is_stored = await pipe.execute()
        index += len(raw_events)
        for event in _decode(job_id, raw_events):
            if event is not None and cursor.accept(event):
                yield event
                if event.is_terminal:
                    return
        if status is None or status.decode() in TERMINAL_STATUSES:
            async for event in _ending(redis, keys, job_id, cursor, bool(is_stored)):
                yield event
            return
        delay = POLL_MIN_S if raw_events else min(delay * 1.5, POLL_MAX_S)
        await asyncio.sleep(delay)


def _decode(job_id: str, raw_events: list[bytes]) -> list[TokenEvent | None]:
    """Stored events in list order; ``None`` for one that cannot be read (logged)."""
    events: list[TokenEvent | None] = []
    for raw in raw_events:
        try:
            events.append(unpack_event(raw))
        except ProtocolError as exc:
            logger.warning("job %s: skipped a malformed stored event: %s", job_id, exc)
            events.append(None)
    return events


async def _ending(redis: aioredis.Redis, keys: Keys, job_id: str, cursor: _Cursor,
                  are_events_stored: bool) -> AsyncGenerator[TokenEvent, None]:
    """A finished job without a stored terminal event: the text the events no longer
    hold (when the list is gone), then a terminal event made from the job hash."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.job(job_id))
        pipe.get(keys.job_text(job_id))
        fields, raw_text = await pipe.execute()
    if not are_events_stored:
        text = (raw_text or b"").decode("utf-8", "replace")
        for event in _text_catch_up(job_id, cursor, text):
            cursor.accept(event)
            yield event
    yield _final_event(job_id, fields, cursor.last_seq + 1)


def _text_catch_up(job_id: str, cursor: _Cursor, text: str) -> list[TokenEvent]:
    """Events that bring the reader's client from what it has to the job's whole ``text``."""
    seq = cursor.last_seq + 1
    given = None if cursor.text is None else "".join(cursor.text)
    if given is not None and text.startswith(given):
        rest = text[len(given):]
        return [TokenEvent(id=job_id, seq=seq, type=EVENT_TOKEN, text=rest)] if rest else []
    if not text:
        return []
    return [TokenEvent(id=job_id, seq=seq, type=EVENT_RESTART),
            TokenEvent(id=job_id, seq=seq + 1, type=EVENT_TOKEN, text=text)]


def _final_event(job_id: str, fields: dict[bytes, bytes], seq: int) -> TokenEvent:
    """A terminal event made from the job hash, for jobs that ended without one."""
    if not fields:
        return TokenEvent(id=job_id, seq=seq, type=EVENT_ERROR, error="the job expired")
    status = str_field(fields, "status")
    prompt_tokens = int_field(fields, "prompt_tokens") or 0
    completion_tokens = int_field(fields, "completion_tokens") or 0
    reason = str_field(fields, "finish_reason") or None
    if status == "failed":
        error = str_field(fields, "error") or "the job failed"
        return TokenEvent(id=job_id, seq=seq, type=EVENT_ERROR, error=error,
                          finish_reason=reason, prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens)
    default_reason = "cancelled" if status == "cancelled" else "stop"
    return TokenEvent(id=job_id, seq=seq, type=EVENT_DONE, finish_reason=reason or default_reason,
                      prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


async def has_ended_by(redis: aioredis.Redis, keys: Keys, job_id: str, seq: int) -> bool:
    """True when the job's stored terminal event has a sequence number <= ``seq`` (a client
    resuming after it has already had the whole stream)."""
    raw = await redis.lindex(keys.job_events(job_id), -1)
    if raw is None:
        return False
    try:
        last = unpack_event(raw)
    except ProtocolError:
        return False
    return last.is_terminal and last.seq <= seq


def is_queue_timeout(event: TokenEvent) -> bool:
    """The terminal event of a request that waited in the queue past its ``timeout``."""
    return event.type == EVENT_ERROR and event.finish_reason == QUEUE_TIMEOUT_REASON
