"""Job records (``Keys.job``) as the API shows them, cancellation and purging.

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
from shared.errors import ConflictError, JobNotFoundError
from shared.job_record import CANCEL_LUA, PURGE_LUA, JobField, str_field
from shared.job_view import job_view
from shared.keys import Keys

__all__ = ["JobStore", "job_view"]


class JobStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, job_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._job_ttl_s = job_ttl_s
        self._cancel = redis.register_script(CANCEL_LUA)
        self._purge = redis.register_script(PURGE_LUA)

    async def fields(self, job_id: str, principal: Principal) -> dict[bytes, bytes]:
        """The job hash; ``JobNotFoundError`` if unknown or someone else's."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.job(job_id))
        self._check(job_id, fields, principal)
        return fields

    async def read(self, job_id: str, principal: Principal) -> tuple[dict[bytes, bytes], str]:
        """The job hash and its text in one round trip; ``JobNotFoundError`` as above."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.job(job_id))
            pipe.get(self._keys.job_text(job_id))
            fields, text = await pipe.execute()
        self._check(job_id, fields, principal)
        return fields, (text or b"").decode("utf-8", "replace")

    async def get(self, job_id: str, principal: Principal) -> dict[str, Any]:
        return job_view(job_id, *await self.read(job_id, principal))

    async def cancel(self, job_id: str, principal: Principal) -> dict[str, Any]:
        keys = [self._keys.job(job_id), self._keys.cancel(job_id), self._keys.webhook_events]
        found = await self._cancel(keys=keys, args=[self._job_ttl_s, time.time(),
                                                     principal.owner])
        if not found:
            raise JobNotFoundError(f"job {job_id!r} not found")
        return await self.get(job_id, principal)

    async def request_cancel(self, job_id: str, owner: str) -> None:
        """Cancel without reading back (a streaming client went away)."""
        keys = [self._keys.job(job_id), self._keys.cancel(job_id), self._keys.webhook_events]
        await self._cancel(keys=keys, args=[self._job_ttl_s, time.time(), owner])

    async def purge(self, job_id: str, principal: Principal) -> dict[str, Any]:
        """Remove a finished job now: record, text, events, index entry, Idempotency-Key."""
        fields = await self.fields(job_id, principal)
        keys = self._keys
        binding = str_field(fields, JobField.IDEMPOTENCY) or keys.idempotency("", "none")
        found = await self._purge(
            keys=[keys.job(job_id), keys.job_text(job_id), keys.job_events(job_id),
                  keys.cancel(job_id), keys.owner_jobs(principal.owner), binding],
            args=[principal.owner, job_id])
        if found == 0:
            raise JobNotFoundError(f"job {job_id!r} not found")
        if found == -1:
            status = str_field(fields, JobField.STATUS)
            raise ConflictError(
                f"job {job_id!r} is {status}: only a finished job can be purged; cancel it "
                "first (DELETE without purge), then purge it once its status is cancelled",
                param="purge", code="job_not_finished")
        return {"id": job_id, "object": "job", "deleted": True}

    @staticmethod
    def _check(job_id: str, fields: dict[bytes, bytes], principal: Principal) -> None:
        owner = fields.get(JobField.OWNER.encode(), b"").decode() if fields else None
        if owner != principal.owner:
            raise JobNotFoundError(f"job {job_id!r} not found")
