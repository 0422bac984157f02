"""Per-key rate limits: one atomic Lua call, both limits all or nothing, sliding window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shared import ratelimit
from shared.keys import Keys
from shared.ratelimit import WINDOW_S, RateLimiter, seconds_until_fits
from shared.redis_conn import async_client
from shared.settings import Settings
from tests.conftest import free_port

KEYS = Keys("tfrl")


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = async_client(Settings(redis_url=redis_url))
    yield client
    await client.aclose()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``time.time()`` as seen by the limiter: ``clock[0]``, at 10 s into a window."""
    now = [1_800_000_000.0 - 1_800_000_000.0 % WINDOW_S + 10.0]
    monkeypatch.setattr(ratelimit.time, "time", lambda: now[0])
    return now


async def test_rpm_allows_n_then_refuses_until_the_window_frees(
        aredis: aioredis.Redis, clock: list[float]) -> None:
    limiter = RateLimiter(aredis, KEYS)
    assert all([(await limiter.check("k", 4, None, 1000)).allowed for _ in range(4)])
    refused = await limiter.check("k", 4, None, 1)
    assert not refused.allowed and refused.retry_after_s >= 1
    assert "4 requests per minute" in refused.reason
    assert (await limiter.check("other", 4, None, 1)).allowed  # limits are per key
    clock[0] += 2 * WINDOW_S
    assert (await limiter.check("k", 4, None, 1)).allowed


async def test_tpm_counts_tokens_not_requests(aredis: aioredis.Redis,
                                              clock: list[float]) -> None:
    assert (await ratelimit.check(aredis, KEYS, "k", None, 100, 60)).allowed
    assert (await ratelimit.check(aredis, KEYS, "k", None, 100, 40)).allowed
    refused = await ratelimit.check(aredis, KEYS, "k", None, 100, 1)
    assert not refused.allowed and refused.retry_after_s >= 1
    assert "100 tokens per minute" in refused.reason
    assert (await ratelimit.check(aredis, KEYS, "k", None, 100, 0)).allowed  # 0 tokens fit


async def test_concurrent_requests_never_overspend(aredis: aioredis.Redis,
                                                   clock: list[float]) -> None:
    limiter = RateLimiter(aredis, KEYS)
    tokens = await asyncio.gather(*(limiter.check("k1", 0, 1000, 100) for _ in range(30)))
    assert sum(d.allowed for d in tokens) == 10
    requests = await asyncio.gather(*(limiter.check("k2", 5, 10_000, 1) for _ in range(12)))
    assert sum(d.allowed for d in requests) == 5
    denied = next(d for d in tokens if not d.allowed)
    assert denied.retry_after_s >= 1 and "tokens per minute" in denied.reason


async def test_both_limits_are_spent_together_or_not_at_all(aredis: aioredis.Redis,
                                                            clock: list[float]) -> None:
    limiter = RateLimiter(aredis, KEYS)
    assert (await limiter.check("k", 3, 100, 90)).allowed
    refused = await limiter.check("k", 3, 100, 20)  # tokens refuse: no request is counted
    assert not refused.allowed and "tokens per minute" in refused.reason
    assert (await limiter.check("k", 3, 100, 5)).allowed
    assert (await limiter.check("k", 3, 100, 5)).allowed  # 3rd request: still within rpm
    over = await limiter.check("k", 3, 100, 0)
    assert not over.allowed and "3 requests per minute" in over.reason
    assert await aredis.get(KEYS.rate_limit("k", "tokens", int(clock[0] // WINDOW_S))) == b"100"


async def test_the_window_slides(aredis: aioredis.Redis, clock: list[float]) -> None:
    limiter = RateLimiter(aredis, KEYS)
    for _ in range(6):
        assert (await limiter.check("k", 6, 0, 1)).allowed
    refused = await limiter.check("k", 6, 0, 1)
    assert not refused.allowed
    assert refused.retry_after_s == 60  # 10 s into the next window: 6*50/60 + 1 <= 6

    clock[0] += WINDOW_S  # next window, 10 s in: the previous one still weighs 50/60 -> 5
    assert (await limiter.check("k", 6, 0, 1)).allowed
    again = await limiter.check("k", 6, 0, 1)
    assert not again.allowed and again.retry_after_s == 10  # at 20 s: 6*40/60 + 1 + 1 = 6
    clock[0] += 10
    assert (await limiter.check("k", 6, 0, 1)).allowed

    clock[0] += 2 * WINDOW_S  # both windows old: the full budget again
    assert all([(await limiter.check("k", 6, 0, 1)).allowed for _ in range(6)])


async def test_a_request_larger_than_the_token_limit_is_refused_outright(
        aredis: aioredis.Redis) -> None:
    decision = await RateLimiter(aredis, KEYS).check("k", 0, 50, 60)
    assert not decision.allowed and "more than" in decision.reason
    assert decision.retry_after_s >= 1


async def test_no_limits_means_no_redis_call() -> None:
    dead = async_client(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        assert (await RateLimiter(dead, KEYS).check("k", 0, None, 10**9)).allowed
        assert (await ratelimit.check(dead, KEYS, "k", None, None, 5)).allowed
    finally:
        await dead.aclose()


@pytest.mark.parametrize(("limit", "now", "prev", "need", "elapsed", "expected"), [
    (10, 0, 0, 1, 0.5, 0.0),  # fits at once
    (10, 5, 10, 1, 0.0, 0.6 * WINDOW_S),  # prev*(1-f) <= 4 from f = 0.6
    (10, 10, 0, 1, 0.5, 0.5 * WINDOW_S + 0.1 * WINDOW_S),  # next window, 10*(1-g)+1 <= 10
    (100, 0, 100, 100, 0.25, 0.75 * WINDOW_S),  # whole budget: the previous must slide out
])
def test_seconds_until_fits(limit: int, now: int, prev: int, need: int, elapsed: float,
                            expected: float) -> None:
    assert seconds_until_fits(limit, now, prev, need, elapsed) == pytest.approx(expected)
