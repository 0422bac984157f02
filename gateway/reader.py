"""A job's events as one async iterator, whether they arrive live or are read back.

Live: from the request's ``Mailbox``. If nothing arrives for ``IDLE_CHECK_S`` the job hash
is checked; when it is over (a lost pub/sub message, a cancel while queued) the reader
switches to the replay path, which reads ``Keys.job_events`` and so misses nothing.

Replay: ``LRANGE`` the event list from the last index read, every ``POLL_MIN_S`` to
``POLL_MAX_S``, until a terminal event or a terminal job status. Events are deduplicated by
``seq``, which increases over the job's whole life (across retries).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

import redis.asyncio as aioredis

from gateway.events import Mailbox
from shared.errors import ProtocolError
from shared.job_record import TERMINAL_STATUSES, int_field, str_field
from shared.keys import Keys
from shared.protocol import EVENT_DONE, EVENT_ERROR, TokenEvent, unpack_event

logger = logging.getLogger("tokenfleet.gateway")

IDLE_CHECK_S = 2.0
POLL_MIN_S = 0.02
POLL_MAX_S = 0.05


async def job_events(redis: aioredis.Redis, keys: Keys, job_id: str,
                     mailbox: Mailbox | None = None) -> AsyncGenerator[TokenEvent, None]:
    """Every event of the job from its start, ending with exactly one terminal event."""
    last_seq = -1
    if mailbox is not None:
        while True:
            event = await mailbox.get(IDLE_CHECK_S)
            if event is None:
                status = await redis.hget(keys.job(job_id), "status")
                if status is None or status.decode() in TERMINAL_STATUSES:
                    break  # finished (or expired) without us hearing it: read it back
                continue
            if event.seq <= last_seq:
                continue
            last_seq = event.seq
            yield event
            if event.is_terminal:
                return
    async for event in _replay(redis, keys, job_id, last_seq):
        yield event


async def _replay(redis: aioredis.Redis, keys: Keys, job_id: str,
                  last_seq: int) -> AsyncGenerator[TokenEvent, None]:
    index = 0
    delay = POLL_MIN_S
    while True:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.job(job_id), "status")  # status first: then the list is complete
            pipe.lrange(keys.job_events(job_id), index, -1)
            status, raw_events = await pipe.execute()
        for raw in raw_events:
            index += 1
            try:
                event = unpack_event(raw)
            except ProtocolError as exc:
                logger.warning("job %s: skipped a malformed stored event: %s", job_id, exc)
                continue
            if event.seq <= last_seq:
                continue
            last_seq = event.seq
            yield event
            if event.is_terminal:
                return
        if status is None or status.decode() in TERMINAL_STATUSES:
            yield await _final_event(redis, keys, job_id, last_seq + 1)
            return
        delay = POLL_MIN_S if raw_events else min(delay * 1.5, POLL_MAX_S)
        await asyncio.sleep(delay)


async def _final_event(redis: aioredis.Redis, keys: Keys, job_id: str, seq: int) -> TokenEvent:
    """A terminal event made from the job hash, for jobs that ended without one."""
    fields = await redis.hgetall(keys.job(job_id))
    if not fields:
        return TokenEvent(id=job_id, seq=seq, type=EVENT_ERROR, error="the job expired")
    status = str_field(fields, "status")
    prompt_tokens = int_field(fields, "prompt_tokens") or 0
    completion_tokens = int_field(fields, "completion_tokens") or 0
    if status == "failed":
        error = str_field(fields, "error") or "the job failed"
        return TokenEvent(id=job_id, seq=seq, type=EVENT_ERROR, error=error,
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    default_reason = "cancelled" if status == "cancelled" else "stop"
    reason = str_field(fields, "finish_reason") or default_reason
    return TokenEvent(id=job_id, seq=seq, type=EVENT_DONE, finish_reason=reason,
                      prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
