"""``GET /v1/jobs``: the caller's jobs, newest first, in OpenAI's list shape.

Each key's jobs are indexed in a sorted set by ``created_at`` (``Keys.owner_jobs``), written
by ``ENQUEUE_LUA`` with the job and trimmed there to ``TOKENFLEET_JOB_TTL_S``, so the index
of a key holds at most the jobs it created within one TTL. A page costs ``O(log n)`` to find
``after`` (``ZREVRANK``) plus the jobs it reads; with a ``status`` filter at most
``MAX_EXAMINED`` jobs are read per page, so a rare status never makes a request scan a key's
whole history: the page then ends early with ``has_more`` and a ``last_id`` to continue from.
Jobs whose record expired (or was purged elsewhere) are dropped from the index on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from shared.errors import InvalidRequestError
from shared.job_record import JobField, str_field
from shared.job_view import job_view
from shared.keys import Keys

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_EXAMINED = 1000  # jobs one filtered page may read
READ_CHUNK = 100  # jobs read per round trip while filtering


@dataclass(slots=True)
class _Page:
    data: list[dict[str, Any]] = field(default_factory=list)
    last_examined: str | None = None
    num_examined: int = 0
    gone: list[str] = field(default_factory=list)  # indexed ids whose record has expired


async def list_jobs(redis: aioredis.Redis, keys: Keys, owner: str, *, after: str | None,
                    limit: int, status: str | None) -> dict[str, Any]:
    """The list body: ``{"object": "list", "data", "first_id", "last_id", "has_more"}``."""
    index = keys.owner_jobs(owner)
    start = 0
    if after is not None:
        rank = await redis.zrevrank(index, after)
        if rank is None:
            raise InvalidRequestError(
                f"after: {after!r} is not one of your jobs (unknown, expired or purged); "
                "pass an id from a previous page's data", param="after")
        start = rank + 1
    page = _Page()
    has_more = await _fill(redis, keys, index, start, limit, status, page)
    if page.gone:
        await redis.zrem(index, *page.gone)
    last_id = page.data[-1]["id"] if page.data else None
    if has_more and status is not None:
        last_id = page.last_examined  # continue after the last job read, shown or not
    return {"object": "list", "data": page.data,
            "first_id": page.data[0]["id"] if page.data else None,
            "last_id": last_id, "has_more": has_more}


async def _fill(redis: aioredis.Redis, keys: Keys, index: str, start: int, limit: int,
                status: str | None, page: _Page) -> bool:
    """Read jobs from rank ``start`` into ``page``; True when more jobs follow."""
    chunk = limit + 1 if status is None else READ_CHUNK
    while True:
        ids = [raw.decode() for raw in await redis.zrevrange(index, start, start + chunk - 1)]
        if not ids:
            return False
        if len(page.data) == limit or page.num_examined == MAX_EXAMINED:
            return True  # more follow, and this page is full: the records are not read
        records = await _read(redis, keys, ids)
        for job_id, (fields, text) in zip(ids, records, strict=True):
            if len(page.data) == limit or page.num_examined == MAX_EXAMINED:
                return True
            page.num_examined += 1
            page.last_examined = job_id
            if not fields:
                page.gone.append(job_id)
            elif status is None or str_field(fields, JobField.STATUS) == status:
                page.data.append(job_view(job_id, fields, text))
        start += len(ids)
        if len(ids) < chunk:
            return False


async def _read(redis: aioredis.Redis, keys: Keys,
                ids: list[str]) -> list[tuple[dict[bytes, bytes], str]]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
            pipe.get(keys.job_text(job_id))
        replies = await pipe.execute()
    return [(fields, (text or b"").decode("utf-8", "replace"))
            for fields, text in zip(replies[::2], replies[1::2], strict=True)]
