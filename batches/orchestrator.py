"""Drive one batch for one slice: validate, feed the batch lane, collect, finalize.

A slice runs at most ``TOKENFLEET_BATCH_SLICE_S`` of feeding, then raises arq's ``Retry``
so the same arq job (same id) runs again from Redis state: a batch never needs its process
to survive, only Redis. Everything a slice knows it reads at start (batch hash, in-flight
hash) and everything it changes goes through lease-fenced scripts (``batches.records``).

Feeding keeps at most ``TOKENFLEET_BATCH_MAX_IN_FLIGHT`` of the batch's jobs queued or
running, far under ``TOKENFLEET_BACKLOG_LIMIT``; a 429 from the backlog check only pauses
feeding. Workers read the interactive lane first, so interactive requests overtake these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from arq.worker import Retry

from batches import lines as out
from batches.files import FileStore
from batches.finalize import finalize
from batches.input import InputLine, LineSplitter, is_blank, iter_lines, parse_line
from batches.lease import Lease
from batches.records import InFlight, Records
from batches.store import (
    CANCELLED,
    CANCELLING,
    EXPIRED,
    FAILED,
    IN_PROGRESS,
    VALIDATING,
)
from batches.validation import Validator
from gateway.state import GatewayState
from gateway.submit import enqueue
from shared.errors import InvalidRequestError, RateLimitedError
from shared.job_record import TERMINAL_STATUSES

logger = logging.getLogger("tokenfleet.batches")

CANCEL_WAIT_S = 30.0  # how long a cancel waits for in-flight jobs before dropping them


def _field(fields: dict[bytes, bytes], name: str) -> str:
    return fields.get(name.encode(), b"").decode()


class BatchSlice:
    def __init__(self, gw: GatewayState, files: FileStore, batch_id: str, lease: Lease,
                 fields: dict[bytes, bytes]) -> None:
        self.gw = gw
        self.files = files
        self.batch_id = batch_id
        self.settings = gw.settings
        self.records = Records(gw.redis, gw.keys, batch_id, lease)
        self.owner = _field(fields, "owner")
        self.endpoint = _field(fields, "endpoint")
        self.input_file_id = _field(fields, "input_file_id")
        self.expires_at = float(_field(fields, "expires_at") or "inf")
        self.status = _field(fields, "status")
        self.cursor = int(_field(fields, "cursor") or 0)
        self.cursor_line = int(_field(fields, "cursor_line") or 0)
        self.stop_since = float(_field(fields, "stop_since") or 0)
        self.inflight: dict[str, InFlight] = {}
        self._reader: AsyncIterator[tuple[int, bytes]] | None = None
        self._held: tuple[InputLine, tuple[int, int]] | None = None  # queue was full
        self._cancel_sent: set[str] = set()
        self._input_done = False

    # --- the slice -------------------------------------------------------------------------

    async def run(self) -> str:
        """Work until the batch ends (its final status) or the slice's time is up (Retry)."""
        if self.status == VALIDATING and not await self._validate():
            return FAILED
        deadline = time.monotonic() + self.settings.batch_slice_s
        await self._resume_inflight()
        try:
            while True:
                await self._refresh_status()
                stopping = self._stopping()
                if stopping is None:
                    await self._feed()
                await self._collect()
                if stopping is not None:
                    if await self._wind_down():
                        return await self._finish(stopping)
                elif self._input_done and not self.inflight and self._held is None:
                    return await self._finish(None)
                if time.monotonic() >= deadline:
                    raise Retry(defer=0)
                await asyncio.sleep(self.settings.batch_poll_s)
        finally:
            if self._reader is not None:
                with contextlib.suppress(Exception):
                    await self._reader.aclose()  # type: ignore[attr-defined]

    async def _finish(self, stopping: str | None) -> str:
        return await finalize(self.gw, self.files, self.records, self.batch_id, self.owner,
                              self.input_file_id, stopping)

    def _stopping(self) -> str | None:
        """``cancelled`` or ``expired`` when the batch must stop feeding, else ``None``."""
        if self.status == CANCELLING:
            return CANCELLED
        if time.time() >= self.expires_at:
            return EXPIRED
        return None

    async def _refresh_status(self) -> None:
        self.status = (await self.gw.redis.hget(self.records.batch_key, "status")
                       or b"").decode()

    # --- validating ------------------------------------------------------------------------

    async def _validate(self) -> bool:
        validator = Validator(self.gw, self.files, self.batch_id, self.owner,
                              self.input_file_id, self.endpoint)
        result = await validator.run()
        await self.gw.redis.delete(self.gw.keys.batch_seen(self.batch_id))
        await self._refresh_status()
        if self.status == CANCELLING:
            return True  # the slice loop finalizes it as cancelled
        if result.num_errors:
            now = int(time.time())
            await self.records.set(status=FAILED, failed_at=now, total=result.num_lines,
                                   num_errors=result.num_errors,
                                   errors=json.dumps(result.as_openai()))
            await self._close_failed()
            logger.info("batch %s failed validation: %d errors", self.batch_id,
                        result.num_errors)
            return False
        await self.records.set(status=IN_PROGRESS, in_progress_at=int(time.time()),
                               total=result.num_lines, cursor=0, cursor_line=0)
        self.status = IN_PROGRESS
        logger.info("batch %s: %d lines valid, running", self.batch_id, result.num_lines)
        return True

    async def _close_failed(self) -> None:
        keys = self.gw.keys
        async with self.gw.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.active_batches, self.batch_id)
            pipe.expire(keys.batch(self.batch_id), self.settings.batch_ttl_s)
            await pipe.execute()

    # --- feeding ---------------------------------------------------------------------------

    def _open_reader(self) -> AsyncIterator[tuple[int, bytes]]:
        return iter_lines(self.files.iter_bytes(self.input_file_id, start=self.cursor),
                          start_offset=self.cursor,
                          max_line_bytes=self.settings.max_body_bytes + 1)

    async def _next_line(self) -> tuple[InputLine, tuple[int, int]] | None:
        """The next request line and the cursor just past it; ``None`` at the end."""
        if self._reader is None:
            self._reader = self._open_reader()
        async for offset, raw in self._reader:
            self.cursor_line += 1
            number = self.cursor_line
            next_cursor = (offset + len(raw) + 1, number)
            if is_blank(raw):
                self.cursor = next_cursor[0]
                continue
            return parse_line(raw, number, offset, self.endpoint), next_cursor
        self._input_done = True
        return None

    async def _feed(self) -> None:
        room = self.settings.batch_max_in_flight - len(self.inflight)
        while room > 0 and not self._input_done:
            found = self._held or await self._next_line()
            if found is None:
                return
            line, cursor = found
            self._held = None
            if not await self._submit(line, cursor):
                self._held = found
                return  # the queue is full: try again at the next poll
            room -= 1

    async def _submit(self, line: InputLine, cursor: tuple[int, int] | None) -> bool:
        """Submit one line (``False``: the queue is full, try later)."""
        try:
            sub = await out.submission(self.gw, line, self.owner)
        except RateLimitedError:
            return False
        except InvalidRequestError as exc:  # valid at validation, refused now (model gone)
            await self.records.record(line.custom_id, "", out.refused(line.custom_id, exc),
                                      "failed", cursor=cursor)
            return True
        item = InFlight(line.custom_id, sub.id, line.offset, line.number)
        await self.records.claim(item, cursor)
        await enqueue(self.gw, sub)
        self.inflight[item.custom_id] = item
        return True

    async def _resubmit(self, item: InFlight) -> None:
        """A line claimed but whose job does not exist (killed before it was queued)."""
        chunks = self.files.iter_bytes(self.input_file_id, start=item.offset,
                                       chunk_bytes=64 * 1024)
        splitter = LineSplitter(item.offset, self.settings.max_body_bytes + 1)
        raw = b""
        async for chunk in chunks:
            found = next(iter(splitter.feed(chunk)), None)
            if found is not None:
                raw = found[1]
                break
        else:
            raw = next(iter(splitter.finish()), (0, b""))[1]
        line = parse_line(raw, item.line, item.offset, self.endpoint)
        self.inflight.pop(item.custom_id, None)
        if not await self._submit(line, None):
            await asyncio.sleep(1.0)  # queue full: the next slice tries again
            self.inflight[item.custom_id] = item

    async def _resume_inflight(self) -> None:
        items = await self.records.inflight()
        if not items:
            return
        async with self.gw.redis.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.exists(self.gw.keys.job(item.job_id))
            exists = await pipe.execute()
        for item, found in zip(items, exists, strict=True):
            self.inflight[item.custom_id] = item
            if not found:
                await self._resubmit(item)
        logger.info("batch %s: resumed with %d lines in flight", self.batch_id, len(items))

    # --- collecting ------------------------------------------------------------------------

    async def _collect(self) -> None:
        if not self.inflight:
            return
        items = list(self.inflight.values())
        keys = self.gw.keys
        async with self.gw.redis.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.hget(keys.job(item.job_id), "status")
            statuses = await pipe.execute()
        done = [(item, s.decode()) for item, s in zip(items, statuses, strict=True)
                if s is None or s.decode() in TERMINAL_STATUSES]
        for item, status in done:
            await self._finished(item, status if status is not None else "")

    async def _finished(self, item: InFlight, status: str) -> None:
        keys = self.gw.keys
        if not status:  # the job's record is gone (expired?): run the line again
            await self._resubmit(item)
            return
        if status == "cancelled" and self._stopping() is not None:
            await self.records.drop(item)
            self.inflight.pop(item.custom_id, None)
            return
        async with self.gw.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job(item.job_id))
            pipe.get(keys.job_text(item.job_id))
            fields, text = await pipe.execute()
        result, prompt_tokens, completion_tokens = out.from_job(item.custom_id, item.job_id,
                                                                fields, text)
        counter = "completed" if result[:1] == out.OUTPUT else "failed"
        await self.records.record(item.custom_id, item.job_id, result, counter,
                                  (prompt_tokens, completion_tokens))
        self.inflight.pop(item.custom_id, None)

    # --- cancelling and expiring -----------------------------------------------------------

    async def _wind_down(self) -> bool:
        """Cancel what is in flight; ``True`` once nothing is (or waiting is over)."""
        if not self.inflight:
            return True
        now = time.time()
        if not self.stop_since:
            self.stop_since = now
            await self.records.set(stop_since=now)
        for item in self.inflight.values():
            if item.job_id not in self._cancel_sent:
                await self.gw.jobs.request_cancel(item.job_id, self.owner)
                self._cancel_sent.add(item.job_id)
        if now - self.stop_since < CANCEL_WAIT_S:
            return False
        for item in list(self.inflight.values()):  # a worker never answered: give up on it
            await self.records.drop(item)
        self.inflight.clear()
        return True
