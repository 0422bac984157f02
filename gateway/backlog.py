"""Backpressure: refuse new work (429) when a model's queue is longer than the limit.

The backlog of a model is, over its lanes, what the worker group has not yet been given
(``lag``) plus what it holds unacknowledged (``pending``), from ``XINFO GROUPS``. It is read
at most every ``REFRESH_S`` per model, so a burst can overshoot the limit by what arrives
in that window; in exchange the hot path pays no Redis round trip.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.errors import RateLimitedError
from shared.keys import LANES, WORKER_GROUP, Keys

REFRESH_S = 0.2


class Backlog:
    def __init__(self, redis: aioredis.Redis, keys: Keys, limit: int) -> None:
        self.redis = redis
        self.keys = keys
        self.limit = limit
        self._seen: dict[str, tuple[float, int]] = {}  # model -> (monotonic time, backlog)
        self._lock = asyncio.Lock()

    async def check(self, model: str) -> None:
        """Raise ``RateLimitedError`` (429 + Retry-After) when the queue is full."""
        if self.limit <= 0:
            return
        size = await self.size(model)
        if size >= self.limit:
            raise RateLimitedError(
                f"the queue for {model!r} is full ({size} requests waiting or running, "
                f"limit {self.limit}); retry later", retry_after_s=1)

    async def size(self, model: str) -> int:
        seen = self._seen.get(model)
        if seen is not None and time.monotonic() - seen[0] < REFRESH_S:
            return seen[1]
        async with self._lock:
            seen = self._seen.get(model)
            if seen is not None and time.monotonic() - seen[0] < REFRESH_S:
                return seen[1]
            size = await self._measure(model)
            self._seen[model] = (time.monotonic(), size)
            return size

    async def _measure(self, model: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        streams = [self.keys.requests_stream(model, lane) for lane in LANES]
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)
        total = 0
        for length, groups in zip(replies[::2], replies[1::2], strict=True):
            if isinstance(groups, ResponseError) or not isinstance(groups, list):
                total += length if isinstance(length, int) else 0  # no group yet: all waiting
                continue
            group = next((g for g in groups if _name(g) == WORKER_GROUP), None)
            if group is None:
                total += length if isinstance(length, int) else 0
                continue
            lag = group.get("lag")
            total += int(group.get("pending") or 0) + (int(lag) if lag is not None else 0)
        return total


def _name(group: dict[str, object]) -> str:
    name = group.get("name")
    return name.decode() if isinstance(name, bytes) else str(name)
