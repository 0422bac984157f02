"""Redis connection factories (one place that sets timeouts, retries and decoding), and
which Redis errors are temporary refusals to back off from."""

from __future__ import annotations

from enum import Enum

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from redis.retry import Retry

from shared.settings import Settings


def _common(settings: Settings) -> dict[str, object]:
    return {
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 15,
        "decode_responses": False,  # payloads are msgpack bytes
    }


def sync_client(settings: Settings, *, socket_timeout_s: float | None = 5.0) -> redis.Redis:
    """Blocking client for the worker's step loop (URL carries password/ACL user/TLS)."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=socket_timeout_s,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2),
        **_common(settings),
    )


def async_client(settings: Settings, *, socket_timeout_s: float | None = 5.0) -> aioredis.Redis:
    """asyncio client for the gateway; fails within about a second when Redis is down."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=socket_timeout_s,
        max_connections=512,
        **_common(settings),
    )


class RedisRefusal(Enum):
    """Why Redis cannot serve a client right now: every one is temporary, so a client backs
    off and retries (a worker keeps its engine state and unsent writes meanwhile)."""

    DOWN = "unreachable"  # connection refused/reset, timeout, still loading its data
    OUT_OF_MEMORY = "refuses writes: out of memory (maxmemory with noeviction)"
    READONLY = "is a read-only replica (failover under way?)"
    MISCONF = "refuses writes: it cannot persist to disk (MISCONF)"


def refusal(exc: redis.RedisError) -> RedisRefusal | None:
    """The temporary refusal ``exc`` stands for, or ``None`` (an error to raise)."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return RedisRefusal.DOWN  # BusyLoadingError (LOADING) is a ConnectionError
    message = str(exc)
    if isinstance(exc, OutOfMemoryError) or message.startswith("OOM "):
        return RedisRefusal.OUT_OF_MEMORY
    if isinstance(exc, ReadOnlyError) or message.startswith("READONLY "):
        return RedisRefusal.READONLY
    if message.startswith("MISCONF "):
        return RedisRefusal.MISCONF
    return None
