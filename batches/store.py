"""Batch records (``Keys.batch``): one Redis hash each, shown as OpenAI ``Batch`` objects.

The gateway creates them (``validating``) and asks for cancels; everything else is
written by the orchestrator (``batches.orchestrator``). Status values, in order:
``validating -> in_progress -> finalizing -> completed``, or ``failed`` (bad input),
``cancelling -> cancelled``, ``expired`` (past ``expires_at``).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from shared.keys import Keys

VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
EXPIRED = "expired"
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED})
COMPLETION_WINDOWS = {"24h": 86_400}

# The OpenAI timestamp fields, each set once when its status is reached.
TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
              "failed_at", "expired_at", "cancelling_at", "cancelled_at")

# Ask for a cancel: only a batch that has not reached finalizing can still be cancelled.
# Returns 0: not found / not the owner; 1: cancelling (now or already); 2: too late.
_CANCEL_LUA = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if (not owner) or owner ~= ARGV[1] then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[2])
  return 1
end
if status == 'cancelling' or status == 'cancelled' then return 1 end
return 2
"""


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def _text(fields: dict[bytes, bytes], name: str) -> str | None:
    value = fields.get(name.encode())
    return None if value is None or value == b"" else value.decode("utf-8", "replace")


def _int(fields: dict[bytes, bytes], name: str) -> int:
    value = fields.get(name.encode())
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _timestamp(fields: dict[bytes, bytes], name: str) -> int | None:
    value = fields.get(name.encode())
    try:
        return int(float(value)) if value else None
    except ValueError:
        return None


def batch_view(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """The OpenAI ``Batch`` object (plus ``usage`` so progress can show tokens/s)."""
    errors = _text(fields, "errors")
    view: dict[str, Any] = {
        "id": _text(fields, "id"),
        "object": "batch",
        "endpoint": _text(fields, "endpoint"),
        "errors": json.loads(errors) if errors else None,
        "input_file_id": _text(fields, "input_file_id"),
        "completion_window": _text(fields, "completion_window"),
        "status": _text(fields, "status"),
        "output_file_id": _text(fields, "output_file_id"),
        "error_file_id": _text(fields, "error_file_id"),
    }
    for name in TIMESTAMPS:
        view[name] = _timestamp(fields, name)
    view["request_counts"] = {"total": _int(fields, "total"),
                              "completed": _int(fields, "completed"),
                              "failed": _int(fields, "failed")}
    prompt_tokens, completion_tokens = _int(fields, "prompt_tokens"), _int(fields,
                                                                           "completion_tokens")
    view["usage"] = {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens,
                     "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens_details": {"reasoning_tokens": 0}}
    metadata = _text(fields, "metadata")
    view["metadata"] = json.loads(metadata) if metadata else None
    return view


@dataclass(slots=True)
class NewBatch:
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None

    def mapping(self, batch_id: str, now: float) -> dict[str, str]:
        window_s = COMPLETION_WINDOWS[self.completion_window]
        return {"id": batch_id, "owner": self.owner, "status": VALIDATING,
                "endpoint": self.endpoint, "input_file_id": self.input_file_id,
                "completion_window": self.completion_window,
                "metadata": json.dumps(self.metadata) if self.metadata else "",
                "created_at": str(int(now)), "expires_at": str(int(now + window_s)),
                "total": "0", "completed": "0", "failed": "0"}


class BatchStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._cancel = redis.register_script(_CANCEL_LUA)

    async def create(self, batch: NewBatch) -> tuple[str, dict[bytes, bytes]]:
        batch_id = new_batch_id()
        now = time.time()
        mapping = batch.mapping(batch_id, now)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.batch(batch_id), mapping=mapping)
            pipe.zadd(self.keys.owner_batches(batch.owner), {batch_id: now})
            pipe.zadd(self.keys.active_batches, {batch_id: float(mapping["expires_at"])})
            await pipe.execute()
        return batch_id, {k.encode(): v.encode() for k, v in mapping.items()}

    async def forget(self, batch_id: str, owner: str) -> None:
        """Undo ``create`` (its orchestration job could not be queued)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.batch(batch_id))
            pipe.zrem(self.keys.owner_batches(owner), batch_id)
            pipe.zrem(self.keys.active_batches, batch_id)
            await pipe.execute()

    async def fields(self, batch_id: str, owner: str) -> dict[bytes, bytes] | None:
        fields: dict[bytes, bytes] = await self.redis.hgetall(self.keys.batch(batch_id))
        if not fields or fields.get(b"owner", b"").decode() != owner:
            return None
        return fields

    async def request_cancel(self, batch_id: str, owner: str) -> int:
        """0: no such batch for ``owner``; 1: cancelling; 2: already past cancelling."""
        return int(await self._cancel(keys=[self.keys.batch(batch_id)],
                                      args=[owner, str(int(time.time()))]))

    async def list(self, owner: str, *, limit: int,
                   after: str | None) -> tuple[list[dict[bytes, bytes]], bool]:
        """Newest first; expired records are dropped from the index on the way."""
        index = self.keys.owner_batches(owner)
        start = 0
        if after:
            rank = await self.redis.zrevrank(index, after)
            start = 0 if rank is None else rank + 1
        found: list[dict[bytes, bytes]] = []
        while len(found) <= limit:
            ids = await self.redis.zrevrange(index, start, start + limit)
            if not ids:
                break
            start += len(ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for batch_id in ids:
                    pipe.hgetall(self.keys.batch(batch_id.decode()))
                rows = await pipe.execute()
            gone = [bid for bid, fields in zip(ids, rows, strict=True) if not fields]
            if gone:
                await self.redis.zrem(index, *gone)
            found.extend(fields for fields in rows if fields)
        return found[:limit], len(found) > limit
