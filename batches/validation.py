"""Every line of a batch's input checked before any runs: envelope, duplicates, body.

The body goes through the gateway's own validation (``batches.lines.submission``), so a
line is refused with the interactive API's message, prefixed with its line number.
custom_ids are checked for duplicates in a Redis set, not in memory, so the orchestrator's
footprint does not grow with the file. A resumed validation starts over (it writes nothing
but that set, which it clears first).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from batches.files import FileStore
from batches.input import LineError, is_blank, iter_lines, parse_line
from batches.lines import submission
from gateway.state import GatewayState
from shared.errors import InvalidRequestError, RateLimitedError

FLUSH_EVERY = 256  # lines between duplicate checks (and yields to the event loop)


@dataclass(slots=True)
class Validation:
    num_lines: int = 0
    num_errors: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, error: LineError, limit: int) -> None:
        self.num_errors += 1
        if len(self.errors) < limit:
            self.errors.append(error.as_dict())

    def as_openai(self) -> dict[str, Any]:
        data = sorted(self.errors, key=lambda e: e["line"])
        return {"object": "list", "data": data}


class Validator:
    def __init__(self, gw: GatewayState, files: FileStore, batch_id: str, owner: str,
                 input_file_id: str, endpoint: str) -> None:
        self.gw = gw
        self.files = files
        self.owner = owner
        self.input_file_id = input_file_id
        self.endpoint = endpoint
        self.seen_key = gw.keys.batch_seen(batch_id)
        self.settings = gw.settings
        self.result = Validation()
        self._pending: list[tuple[str, int]] = []

    async def run(self) -> Validation:
        settings, result = self.settings, self.result
        limit_line = settings.max_body_bytes
        await self.gw.redis.delete(self.seen_key)
        number = 0
        lines = iter_lines(self.files.iter_bytes(self.input_file_id),
                           max_line_bytes=limit_line + 1)
        async for offset, raw in lines:
            number += 1
            if is_blank(raw):
                continue
            result.num_lines += 1
            if result.num_lines > settings.max_batch_lines:
                result.add(LineError(number, "too_many_lines", (
                    f"the file has more than {settings.max_batch_lines} requests "
                    "(TOKENFLEET_MAX_BATCH_LINES); split it into several batches")), 1 << 30)
                break
            if len(raw) > limit_line:
                self._add(LineError(number, "line_too_long", (
                    f"the line is longer than {limit_line} bytes (TOKENFLEET_MAX_BODY_BYTES, "
                    "the interactive API's body limit)")))
                continue
            await self._check(raw, number, offset)
            if len(self._pending) >= FLUSH_EVERY:
                await self._flush()
        await self._flush()
        if result.num_lines == 0:
            self._add(LineError(0, "empty_file", "the file has no request lines"))
        return result

    def _add(self, error: LineError) -> None:
        self.result.add(error, self.settings.batch_max_errors)

    async def _check(self, raw: bytes, number: int, offset: int) -> None:
        try:
            line = parse_line(raw, number, offset, self.endpoint)
        except LineError as error:
            self._add(error)
            return
        self._pending.append((line.custom_id, number))
        while True:
            try:
                await submission(self.gw, line, self.owner)
                return
            except InvalidRequestError as exc:
                self._add(LineError(number, "invalid_request", exc.message, exc.param))
                return
            except RateLimitedError as exc:  # the queue is full: validation waits, not fails
                await asyncio.sleep(exc.retry_after_s)

    async def _flush(self) -> None:
        """SADD the custom_ids read since the last flush; 0 means a duplicate."""
        if not self._pending:
            return
        async with self.gw.redis.pipeline(transaction=False) as pipe:
            for custom_id, _ in self._pending:
                pipe.sadd(self.seen_key, custom_id)
            added = await pipe.execute()
        for (custom_id, number), is_new in zip(self._pending, added, strict=True):
            if not is_new:
                self._add(LineError(number, "duplicate_custom_id", (
                    f"custom_id {custom_id!r} is used by an earlier line; each request "
                    "needs a unique custom_id"), "custom_id"))
        self._pending.clear()
        await asyncio.sleep(0)  # CPU-bound stretch: let the lease heartbeat run
