"""Job records (``Keys.job``) as the API shows them, and cancellation.

The gateway writes a job when it enqueues the request (``gateway.submit``); the worker
updates status, timings, counts and text. Status values, field names and the cancel script
are ``shared.job_record``'s. ``GET /v1/jobs/{id}`` reads the hash and the text
in one round trip.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from gateway.auth import Principal
from shared.errors import JobNotFoundError
from shared.job_record import CANCEL_LUA, JobField, JobRecord
from shared.keys import Keys


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(max(end - start, 0.0), 6)


def job_view(job_id: str, fields: dict[bytes, bytes], text: str | None) -> dict[str, Any]:
    """The JSON body of ``GET /v1/jobs/{id}``."""
    record = JobRecord.from_hash(fields)
    created = record.created_at
    return {
        "id": job_id,
        "object": "job",
        "status": record.status,
        "model": record.model,
        "kind": record.kind,
        "lane": record.lane,
        "text": text,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "max_tokens": record.max_tokens,
        "finish_reason": record.finish_reason,
        "error": record.error,
        "worker": record.worker,
        "created_at": created,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "timings": {
            "queue_s": _since(created, record.started_at),
            "ttft_s": _since(created, record.first_token_at),
            "total_s": _since(created, record.finished_at),
        },
    }


class JobStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, job_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._job_ttl_s = job_ttl_s
        self._cancel = redis.register_script(CANCEL_LUA)

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
        owner = fields.get(JobField.OWNER.encode(), b"").decode() if fields else None
        if owner != principal.owner:
            raise JobNotFoundError(f"job {job_id!r} not found")
