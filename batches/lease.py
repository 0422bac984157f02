"""Who drives a batch right now: a short lease in Redis, fencing every write of a slice.

arq marks a running job with an in-progress key that lives for the job's timeout plus
10 s, so after a ``kill -9`` arq would wait that long before running the job again. The
slice holding the lease therefore shortens arq's key to the lease's TTL and refreshes both
every ``ttl / 3``: when the process dies, both expire within ``TOKENFLEET_BATCH_LEASE_S``
and the next poll of any orchestrator resumes the batch. If a live but stalled slice ever
loses its lease, its next write is refused (``LeaseLost``) instead of racing the new owner.
"""

from __future__ import annotations

import secrets

import redis.asyncio as aioredis
from arq.constants import in_progress_key_prefix

# KEYS: lease, arq in-progress key. ARGV: token, ttl ms. 1: refreshed; 0: lost.
_REFRESH_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """Another orchestrator owns the batch now; this slice must stop writing."""


def arq_in_progress_key(arq_job_id: str) -> str:
    return in_progress_key_prefix + arq_job_id


class Lease:
    def __init__(self, redis: aioredis.Redis, key: str, arq_job_id: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = key
        self.arq_key = arq_in_progress_key(arq_job_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.token = secrets.token_hex(8)
        self._refresh = redis.register_script(_REFRESH_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    async def acquire(self) -> bool:
        if not await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        return await self.refresh()

    async def refresh(self) -> bool:
        return bool(await self._refresh(keys=[self.key, self.arq_key],
                                        args=[self.token, self.ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])
