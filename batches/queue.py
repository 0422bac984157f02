"""The arq side shared by the gateway (which queues a batch) and the orchestrator.

One arq job per batch, id ``<prefix>:batch:<batch id>``: arq refuses a second job with
the same id while one is queued, running or its result is kept, so a batch never runs
twice at once. Jobs are serialized with msgpack, never pickle.
"""

from __future__ import annotations

from typing import Any

import msgpack
import redis.asyncio as aioredis
from arq.connections import ArqRedis

from shared.keys import Keys

RUN_BATCH = "run_batch"
JOB_EXPIRES_S = 86_400 + 3_600  # the 24 h window, plus time to finalize an expired batch


def serialize(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def deserialize(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = msgpack.unpackb(data, raw=False)
    return result


def job_id(keys: Keys, batch_id: str) -> str:
    return keys.batch(batch_id)


def arq_redis(redis: aioredis.Redis, keys: Keys) -> ArqRedis:
    """An ``ArqRedis`` on the same connection pool as ``redis`` (no extra connections)."""
    return ArqRedis(connection_pool=redis.connection_pool, job_serializer=serialize,
                    job_deserializer=deserialize, default_queue_name=keys.arq_queue)


async def enqueue_batch(arq: ArqRedis, keys: Keys, batch_id: str) -> bool:
    """Queue the batch's orchestration; ``False`` if its job already exists (a no-op)."""
    job = await arq.enqueue_job(RUN_BATCH, batch_id, _job_id=job_id(keys, batch_id),
                                _expires=JOB_EXPIRES_S)
    return job is not None
