"""Batches (OpenAI ``/v1/batches``): create, read, list (newest first), cancel.

Creating a batch writes its record (``validating``) and queues its arq job; if the job
cannot be queued the record is removed again. Every line is validated by the orchestrator
before any is run: bad lines make the batch ``failed`` with ``errors`` naming them.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from batches.api import BatchAPIDep, bad_request, not_found, page
from batches.files import PURPOSE_BATCH
from batches.input import ENDPOINTS
from batches.queue import enqueue_batch
from batches.store import COMPLETION_WINDOWS, NewBatch, batch_view
from gateway.deps import PrincipalDep

router = APIRouter(tags=["batches"])

_ID = re.compile(r"batch_[A-Za-z0-9_-]{1,64}")
MAX_METADATA_PAIRS = 16


class CreateBatch(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def _check(body: CreateBatch) -> None:
    if body.endpoint not in ENDPOINTS:
        raise bad_request(f"endpoint {body.endpoint!r} is not supported; use one of: "
                          f"{', '.join(ENDPOINTS)}")
    if body.completion_window not in COMPLETION_WINDOWS:
        raise bad_request(f"completion_window must be \"24h\" (got "
                          f"{body.completion_window!r})")
    metadata = body.metadata or {}
    if len(metadata) > MAX_METADATA_PAIRS or any(
            len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise bad_request("metadata holds at most 16 pairs, keys up to 64 and values up to "
                          "512 characters")


@router.post("/v1/batches", summary="Create a batch from an uploaded file")
async def create_batch(body: CreateBatch, api: BatchAPIDep,
                       principal: PrincipalDep) -> dict[str, Any]:
    _check(body)
    record = await api.files.find(body.input_file_id, principal.owner)
    if record is None:
        raise not_found("file", body.input_file_id)
    if record.purpose != PURPOSE_BATCH:
        raise bad_request(f"file {record.id!r} has purpose {record.purpose!r}; a batch needs "
                          "a file uploaded with purpose 'batch'")
    new = NewBatch(owner=principal.owner, endpoint=body.endpoint, input_file_id=record.id,
                   completion_window=body.completion_window, metadata=body.metadata)
    batch_id, fields = await api.batches.create(new)
    try:
        await enqueue_batch(api.arq, api.gw.keys, batch_id)
    except BaseException:
        with contextlib.suppress(RedisError):
            await api.batches.forget(batch_id, principal.owner)
        raise
    return batch_view(fields)


async def _fields(api: BatchAPIDep, batch_id: str, owner: str) -> dict[bytes, bytes]:
    fields = await api.batches.fields(batch_id, owner) if _ID.fullmatch(batch_id) else None
    if fields is None:
        raise not_found("batch", batch_id)
    return fields


@router.get("/v1/batches/{batch_id}", summary="A batch: status, counts, files, timestamps")
async def get_batch(batch_id: str, api: BatchAPIDep, principal: PrincipalDep) -> dict[str, Any]:
    return batch_view(await _fields(api, batch_id, principal.owner))


@router.get("/v1/batches", summary="Your batches, newest first")
async def list_batches(api: BatchAPIDep, principal: PrincipalDep,
                       limit: int = Query(20, ge=1, le=100),
                       after: str | None = None) -> dict[str, Any]:
    rows, has_more = await api.batches.list(principal.owner, limit=limit, after=after)
    return page([batch_view(fields) for fields in rows], has_more)


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel_batch(batch_id: str, api: BatchAPIDep,
                       principal: PrincipalDep) -> dict[str, Any]:
    await _fields(api, batch_id, principal.owner)
    outcome = await api.batches.request_cancel(batch_id, principal.owner)
    fields = await _fields(api, batch_id, principal.owner)
    if outcome == 2:
        raise HTTPException(409, f"batch {batch_id!r} is already "
                            f"{fields.get(b'status', b'').decode()}; it can no longer be "
                            "cancelled")
    return batch_view(fields)
