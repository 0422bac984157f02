"""Fixtures shared by the integration tests (the throw-away Redis is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis import Redis

from shared.redis_conn import async_client
from shared.settings import Settings


@pytest.fixture
def client(redis_url: str) -> Iterator[Redis]:
    """A plain Redis client on the test's Redis (gateway tests override ``client``)."""
    conn = Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client built from the module's ``settings`` fixture."""
    conn = async_client(settings)
    yield conn
    await conn.aclose()
