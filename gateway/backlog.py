"""Backpressure: refuse new work (429) when a model's queue is longer than the limit.

The backlog of a model is, over its lanes, what the worker group has not yet been given
(``lag``) plus what it holds unacknowledged (``pending``), from ``XINFO GROUPS``
(``shared.queue_depth``, which metrics and the autoscaler read too). It is read
at most every ``REFRESH_S`` per model, so a burst can overshoot the limit by what arrives
in that window; in exchange the hot path pays no Redis round trip.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from shared.errors import RateLimitedError
from shared.keys import Keys
from shared.queue_depth import parse_depths, queue_commands

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
        queue_commands(pipe, self.keys, model)
        replies = await pipe.execute(raise_on_error=False)
        return sum(lane.depth for lane in parse_depths(model, replies))
