"""Files (OpenAI ``/v1/files``): upload a batch input, read metadata and content, delete.

The upload is streamed: the body bypasses ``BodyLimitMiddleware``'s buffer (it is far over
the JSON limit), is counted against ``TOKENFLEET_MAX_FILE_BYTES`` as it arrives, and goes
to Redis in ~1 MiB pieces (``batches.files``); an upload that fails leaves nothing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from batches.api import BatchAPIDep, bad_request, not_found, page
from batches.files import PURPOSE_BATCH, FileRecord
from gateway.deps import PrincipalDep

router = APIRouter(tags=["files"])

UPLOAD_PATH = "/v1/files"
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, headers and the purpose field
_ID = re.compile(r"file-[A-Za-z0-9_-]{1,64}")


class _TooLarge(Exception):
    pass


async def _counted(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        yield chunk


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the file is larger than the limit of {limit} bytes "
                         "(TOKENFLEET_MAX_FILE_BYTES); split it into several batches")


async def _store_upload(api: BatchAPIDep, owner: str, upload: UploadFile,
                        limit: int) -> FileRecord:
    writer = api.files.writer(owner, upload.filename or "upload.jsonl", PURPOSE_BATCH)
    try:
        while chunk := await upload.read(1 << 20):
            if writer.num_bytes + len(chunk) > limit:
                raise _too_large(limit)
            await writer.write(chunk)
        if writer.num_bytes == 0:
            raise bad_request("the file is empty; a batch input needs at least one request "
                              "line")
        return await writer.commit()
    except BaseException:
        await writer.abort()
        raise


@router.post(UPLOAD_PATH, summary="Upload a file (multipart: file, purpose=batch)")
async def upload_file(request: Request, api: BatchAPIDep,
                      principal: PrincipalDep) -> dict[str, Any]:
    limit = api.gw.settings.max_file_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD_BYTES:
        raise _too_large(limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("upload a file as multipart/form-data with the fields 'file' and "
                          "'purpose'")
    parser = MultiPartParser(request.headers,
                             _counted(request.stream(), limit + MULTIPART_OVERHEAD_BYTES),
                             max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except _TooLarge:
        raise _too_large(limit) from None
    except MultiPartException as exc:
        raise bad_request(f"malformed multipart body: {exc}") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != PURPOSE_BATCH:
            raise bad_request(f"purpose must be 'batch' (got {purpose!r}); this fleet keeps "
                              "files only as batch inputs")
        if not isinstance(upload, UploadFile):
            raise bad_request("the multipart field 'file' is missing or not a file")
        record = await _store_upload(api, principal.owner, upload, limit)
    finally:
        await form.close()
    return record.view()


async def _record(api: BatchAPIDep, file_id: str, owner: str) -> FileRecord:
    record = await api.files.find(file_id, owner) if _ID.fullmatch(file_id) else None
    if record is None:
        raise not_found("file", file_id)
    return record


@router.get("/v1/files", summary="Your files, newest first")
async def list_files(api: BatchAPIDep, principal: PrincipalDep,
                     purpose: str | None = None, limit: int = Query(100, ge=1, le=10_000),
                     after: str | None = None) -> dict[str, Any]:
    records, has_more = await api.files.list(principal.owner, purpose=purpose, limit=limit,
                                             after=after)
    return page([r.view() for r in records], has_more)


@router.get("/v1/files/{file_id}", summary="A file's metadata")
async def get_file(file_id: str, api: BatchAPIDep, principal: PrincipalDep) -> dict[str, Any]:
    return (await _record(api, file_id, principal.owner)).view()


@router.get("/v1/files/{file_id}/content", summary="A file's bytes")
async def file_content(file_id: str, api: BatchAPIDep,
                       principal: PrincipalDep) -> StreamingResponse:
    record = await _record(api, file_id, principal.owner)
    return StreamingResponse(api.files.iter_bytes(record.id),
                             media_type="application/octet-stream",
                             headers={"Content-Length": str(record.bytes),
                                      "Content-Disposition":
                                      f'attachment; filename="{record.filename}"'})


@router.delete("/v1/files/{file_id}", summary="Delete a file")
async def delete_file(file_id: str, api: BatchAPIDep, principal: PrincipalDep) -> dict[str, Any]:
    record = await _record(api, file_id, principal.owner)
    await api.files.delete(record.id, principal.owner)
    return {"id": record.id, "object": "file", "deleted": True}
