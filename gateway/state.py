"""Everything a gateway process holds while it runs; built in the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from gateway.auth import Authenticator
from gateway.backlog import Backlog
from gateway.catalog import Catalog
from gateway.events import Dispatcher
from gateway.jobs import JobStore
from gateway.metrics import GatewayMetrics
from shared.keys import Keys
from shared.ratelimit import RateLimiter
from shared.settings import Settings

logger = logging.getLogger("tokenfleet.gateway")


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    keys: Keys
    redis: aioredis.Redis
    gateway_id: str
    dispatcher: Dispatcher
    catalog: Catalog
    jobs: JobStore
    backlog: Backlog
    auth: Authenticator
    limiter: RateLimiter
    metrics: GatewayMetrics
    is_shutting_down: bool = False
    _background: set[asyncio.Task[Any]] = field(default_factory=set)
    _scripts: dict[str, AsyncScript] = field(default_factory=dict)

    @property
    def reply_channel(self) -> str:
        return self.dispatcher.channel

    def script(self, lua: str) -> AsyncScript:
        """``redis.register_script(lua)``, made once per script (it hashes the source)."""
        script = self._scripts.get(lua)
        if script is None:
            script = self._scripts[lua] = self.redis.register_script(lua)
        return script

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coro`` in the background (e.g. from a ``finally`` that must not await)."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background task %s failed: %r", task.get_name(), task.exception())

    async def wait_background(self, timeout_s: float) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)
