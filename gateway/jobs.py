"""Job records (``Keys.job``) as the API shows them, and cancellation.

The gateway writes a job when it enqueues the request (``gateway.submit``); the worker
updates status, timings, counts and text. ``GET /v1/jobs/{id}`` reads the hash and the text
in one round trip.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from gateway.auth import Principal
from shared.errors import JobNotFoundError
from shared.keys import Keys

STATUS_QUEUED = "queued"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

# Set the cancel flag unless the job is already over; a job still queued is cancelled on
# the spot (the worker that later reads it sees the flag and skips it).
_CANCEL_LUA = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if (not owner) or owner ~= ARGV[3] then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2],
             'finish_reason', 'cancelled')
end
return 1
"""


def str_field(fields: dict[bytes, bytes], name: str) -> str | None:
    value = fields.get(name.encode())
    return None if value is None else value.decode("utf-8", "replace")


def int_field(fields: dict[bytes, bytes], name: str) -> int | None:
    value = fields.get(name.encode())
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def float_field(fields: dict[bytes, bytes], name: str) -> float | None:
    value = fields.get(name.encode())
    try:
        return None if value is None or value == b"" else float(value)
    except ValueError:
        return None


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(max(end - start, 0.0), 6)


def job_view(job_id: str, fields: dict[bytes, bytes], text: str | None) -> dict[str, Any]:
    """The JSON body of ``GET /v1/jobs/{id}``."""
    created = float_field(fields, "created_at")
    started = float_field(fields, "started_at")
    first_token = float_field(fields, "first_token_at")
    finished = float_field(fields, "finished_at")
    return {
        "id": job_id,
        "object": "job",
        "status": str_field(fields, "status"),
        "model": str_field(fields, "model"),
        "kind": str_field(fields, "kind"),
        "lane": str_field(fields, "lane"),
        "text": text,
        "prompt_tokens": int_field(fields, "prompt_tokens"),
        "completion_tokens": int_field(fields, "completion_tokens"),
        "max_tokens": int_field(fields, "max_tokens"),
        "finish_reason": str_field(fields, "finish_reason") or None,
        "error": str_field(fields, "error") or None,
        "worker": str_field(fields, "worker") or None,
        "created_at": created,
        "started_at": started,
        "finished_at": finished,
        "timings": {
            "queue_s": _since(created, started),
            "ttft_s": _since(created, first_token),
            "total_s": _since(created, finished),
        },
    }


class JobStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, job_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._job_ttl_s = job_ttl_s
        self._cancel = redis.register_script(_CANCEL_LUA)

    async def fields(self, job_id: str, principal: Principal) -> dict[bytes, bytes]:
        """The job hash; ``JobNotFoundError`` if unknown or someone else's."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.job(job_id))
        self._check(job_id, fields, principal)
        return fields

    async def get(self, job_id: str, principal: Principal) -> dict[str, Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.job(job_id))
            pipe.get(self._keys.job_text(job_id))
            fields, text = await pipe.execute()
        self._check(job_id, fields, principal)
        return job_view(job_id, fields, (text or b"").decode("utf-8", "replace"))

    async def cancel(self, job_id: str, principal: Principal) -> dict[str, Any]:
        keys = [self._keys.job(job_id), self._keys.cancel(job_id)]
        found = await self._cancel(keys=keys, args=[self._job_ttl_s, time.time(),
                                                     principal.owner])
        if not found:
            raise JobNotFoundError(f"job {job_id!r} not found")
        return await self.get(job_id, principal)

    async def request_cancel(self, job_id: str, owner: str) -> None:
        """Cancel without reading back (a streaming client went away)."""
        keys = [self._keys.job(job_id), self._keys.cancel(job_id)]
        await self._cancel(keys=keys, args=[self._job_ttl_s, time.time(), owner])

    @staticmethod
    def _check(job_id: str, fields: dict[bytes, bytes], principal: Principal) -> None:
        if not fields or fields.get(b"owner", b"").decode() != principal.owner:
            raise JobNotFoundError(f"job {job_id!r} not found")
