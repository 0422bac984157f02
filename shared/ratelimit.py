"""Per-key rate limits (requests and tokens per minute), atomic in Redis.

One Lua script checks both budgets and consumes both only when both allow the request, so
concurrent gateways can never overspend. Windows are fixed 60-second buckets keyed by
``floor(unix time / 60)``; ``Retry-After`` is the time left in the bucket. A fixed window
lets a key spend up to twice its budget across a bucket boundary; that is the usual price
for one counter per key and kind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared.keys import Keys

WINDOW_S = 60

# KEYS: requests counter, tokens counter. ARGV: rpm, tpm, tokens, ttl (0 = unlimited).
_SCRIPT = """
local rpm, tpm, tokens, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
    tonumber(ARGV[4])
local used_requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local used_tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
if rpm > 0 and used_requests + 1 > rpm then return {0, 1} end
if tpm > 0 and used_tokens + tokens > tpm then return {0, 2} end
redis.call('INCRBY', KEYS[1], 1)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('INCRBY', KEYS[2], tokens)
redis.call('EXPIRE', KEYS[2], ttl)
return {1, 0}
"""


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after_s: int = 0
    reason: str = ""


class RateLimiter:
    def __init__(self, r: aioredis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._script = r.register_script(_SCRIPT)

    async def check(self, key_id: str, rpm: int | None, tpm: int | None,
                    tokens: int) -> RateDecision:
        """Consume one request and ``tokens`` tokens for ``key_id`` if both budgets allow."""
        rpm, tpm = rpm or 0, tpm or 0
        if rpm <= 0 and tpm <= 0:
            return RateDecision(True)
        now = time.time()
        window = int(now // WINDOW_S)
        retry = max(1, int((window + 1) * WINDOW_S - now + 0.999))
        if tpm > 0 and tokens > tpm:
            return RateDecision(False, retry, f"this request needs {tokens} tokens, more than "
                                f"the key's limit of {tpm} tokens per minute")
        allowed, which = await self._script(
            keys=[self.keys.rate_limit(key_id, "requests", window),
                  self.keys.rate_limit(key_id, "tokens", window)],
            args=[rpm, tpm, tokens, WINDOW_S * 2])
        if allowed:
            return RateDecision(True)
        reason = (f"rate limit: {rpm} requests per minute" if which == 1
                  else f"rate limit: {tpm} tokens per minute")
        return RateDecision(False, retry, reason)
