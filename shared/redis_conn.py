"""Redis connection factories: one place that sets timeouts, retries and decoding."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
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
