"""Per-key rate limits (requests and tokens per minute), atomic in Redis.

One Lua script checks both budgets and consumes both only when both allow the request, so
concurrent requests and gateways can never overspend. The window slides: usage is this
minute's counter plus the previous minute's, weighted by how much of the previous minute
is still inside the last 60 s (the "sliding window counter"; it assumes the previous
minute's traffic was spread evenly). Unlike fixed windows, a key cannot spend twice its
budget across a minute boundary; it costs two counters per kind and key.

Windows come from the gateway's clock (``floor(unix time / 60)``), so gateways need
roughly synchronized clocks (NTP); a skew of a second shifts a window by a second.
``Retry-After`` is computed from the counters: the time until the request would fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared.keys import Keys

WINDOW_S = 60
WINDOW_MS = WINDOW_S * 1000
COUNTER_TTL_S = 2 * WINDOW_S + 1  # a counter is still read as "previous" one window later

# KEYS: requests now, requests previous, tokens now, tokens previous.
# ARGV: rpm, tpm (0 = unlimited), tokens, ms of the previous window still inside the last
# minute, ms per window, counter TTL. Integer arithmetic only (exact in Lua's doubles):
# prev * remaining_ms + (now + need) * window_ms <= limit * window_ms.
# Returns {1} when allowed (and counted), else {0, req_now, req_prev, tok_now, tok_prev}.
_SCRIPT = """
local rpm, tpm, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local remaining, window, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local req_now = tonumber(redis.call('GET', KEYS[1]) or '0')
local req_prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local tok_now = tonumber(redis.call('GET', KEYS[3]) or '0')
local tok_prev = tonumber(redis.call('GET', KEYS[4]) or '0')
local req_ok = rpm <= 0 or req_prev * remaining + (req_now + 1) * window <= rpm * window
local tok_ok = tpm <= 0 or tok_prev * remaining + (tok_now + need) * window <= tpm * window
if not (req_ok and tok_ok) then
  return {0, req_now, req_prev, tok_now, tok_prev}
end
if rpm > 0 then
  redis.call('INCRBY', KEYS[1], 1)
  redis.call('EXPIRE', KEYS[1], ttl)
end
if tpm > 0 then
  redis.call('INCRBY', KEYS[3], need)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return {1}
"""


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after_s: int = 0  # whole seconds, >= 1 when refused
    reason: str = ""


def seconds_until_fits(limit: int, now: int, prev: int, need: int, elapsed: float) -> float:
    """Seconds until ``prev * (1 - f) + now + need <= limit``, ``f`` the window fraction.

    ``elapsed`` is the fraction of the current window already gone (0 <= elapsed < 1).
    Assumes ``need <= limit`` and that nothing else is spent meanwhile.
    """
    room = limit - now - need
    if room >= 0:  # fits in this window once enough of the previous one has slid out
        if prev <= room:
            return 0.0
        return (1.0 - room / prev - elapsed) * WINDOW_S
    # Only in the next window, where this window's count becomes the weighted one.
    fraction = 0.0 if now <= limit - need else 1.0 - (limit - need) / now
    return (1.0 - elapsed + fraction) * WINDOW_S


class RateLimiter:
    """The script, registered once per client (EVALSHA, falling back to EVAL after a flush)."""

    def __init__(self, r: aioredis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._script = r.register_script(_SCRIPT)

    async def check(self, key_id: str, rpm: int | None, tpm: int | None,
                    tokens: int) -> RateDecision:
        """Consume one request and ``tokens`` tokens for ``key_id`` if both budgets allow.

        No Redis call at all when neither limit is set.
        """
        rpm, tpm, tokens = max(rpm or 0, 0), max(tpm or 0, 0), max(tokens, 0)
        if rpm == 0 and tpm == 0:
            return RateDecision(True)
        if tpm > 0 and tokens > tpm:
            return RateDecision(False, WINDOW_S, (
                f"this request needs {tokens} tokens (prompt + max_tokens), more than the "
                f"key's limit of {tpm} tokens per minute; lower max_tokens or shorten the prompt"))
        now = time.time()
        window = int(now // WINDOW_S)
        remaining_ms = min(max(round(((window + 1) * WINDOW_S - now) * 1000), 0), WINDOW_MS)
        elapsed = 1.0 - remaining_ms / WINDOW_MS
        reply = await self._script(
            keys=[self.keys.rate_limit(key_id, "requests", window),
                  self.keys.rate_limit(key_id, "requests", window - 1),
                  self.keys.rate_limit(key_id, "tokens", window),
                  self.keys.rate_limit(key_id, "tokens", window - 1)],
            args=[rpm, tpm, tokens, remaining_ms, WINDOW_MS, COUNTER_TTL_S])
        if int(reply[0]) == 1:
            return RateDecision(True)
        req_now, req_prev, tok_now, tok_prev = (int(x) for x in reply[1:5])
        waits: list[tuple[float, str]] = []
        if rpm > 0:
            wait = seconds_until_fits(rpm, req_now, req_prev, 1, elapsed)
            if wait > 0:
                waits.append((wait, f"rate limit: {rpm} requests per minute"))
        if tpm > 0:
            wait = seconds_until_fits(tpm, tok_now, tok_prev, tokens, elapsed)
            if wait > 0:
                waits.append((wait, f"rate limit: {tpm} tokens per minute (this request "
                                    f"counts {tokens}: prompt + max_tokens)"))
        wait, reason = max(waits, default=(1.0, "rate limit reached"))
        return RateDecision(False, max(1, math.ceil(wait - 1e-6)), reason + "; retry later")


async def check(r: aioredis.Redis, keys: Keys, key_id: str, rpm: int | None, tpm: int | None,
                tokens: int) -> RateDecision:
    """One-off ``RateLimiter(r, keys).check(...)``; a gateway keeps one ``RateLimiter``."""
    return await RateLimiter(r, keys).check(key_id, rpm, tpm, tokens)
