"""Files (OpenAI ``/v1/files``) kept in Redis: metadata hash + content string, one TTL.

Why Redis and not a directory: every gateway and every orchestrator already reaches the
same Redis, on one machine or many, with no shared volume to mount; the TTL expires a file
and its metadata together; AOF makes them as durable as the jobs. The cost is memory, so
uploads are capped by ``TOKENFLEET_MAX_FILE_BYTES`` (100 MiB by default; a 100,000-line
batch of short chats is about 25 MB). Content is written by APPEND in ~1 MiB pieces into
an upload key and renamed into place only when whole, and read back with GETRANGE in
pieces: no process ever holds a whole file, and a failed upload leaves nothing visible.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from shared.keys import Keys

CHUNK_BYTES = 1 << 20
PURPOSE_BATCH = "batch"
PURPOSE_OUTPUT = "batch_output"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


@dataclass(slots=True)
class FileRecord:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int

    def view(self) -> dict[str, Any]:
        """The OpenAI ``File`` object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "expires_at": self.expires_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}

    def mapping(self) -> dict[str, str]:
        return {"id": self.id, "owner": self.owner, "filename": self.filename,
                "purpose": self.purpose, "bytes": str(self.bytes),
                "created_at": str(self.created_at), "expires_at": str(self.expires_at)}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> FileRecord:
        def get(name: str) -> str:
            return fields.get(name.encode(), b"").decode("utf-8", "replace")

        return cls(id=get("id"), owner=get("owner"), filename=get("filename"),
                   purpose=get("purpose"), bytes=int(get("bytes") or 0),
                   created_at=int(get("created_at") or 0),
                   expires_at=int(get("expires_at") or 0))


class FileWriter:
    """Content arrives by ``write``; ``commit`` makes the file visible, ``abort`` drops it."""

    def __init__(self, store: FileStore, file_id: str, owner: str, filename: str,
                 purpose: str) -> None:
        self.store = store
        self.file_id = file_id
        self.owner = owner
        self.filename = filename
        self.purpose = purpose
        self.num_bytes = 0
        self._pending = bytearray()

    async def write(self, data: bytes) -> None:
        self._pending += data
        self.num_bytes += len(data)
        if len(self._pending) >= CHUNK_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        key = self.store.keys.file_upload(self.file_id)
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.append(key, bytes(self._pending))
            pipe.expire(key, self.store.upload_ttl_s)
            await pipe.execute()
        self._pending.clear()

    def record(self) -> FileRecord:
        now = int(time.time())
        return FileRecord(id=self.file_id, owner=self.owner, filename=self.filename,
                          purpose=self.purpose, bytes=self.num_bytes, created_at=now,
                          expires_at=now + self.store.ttl_s)

    async def commit(self) -> FileRecord:
        await self.flush()
        record = self.record()
        async with self.store.redis.pipeline(transaction=True) as pipe:
            self.queue_commit(pipe, record)
            await pipe.execute()
        return record

    def queue_commit(self, pipe: Any, record: FileRecord) -> None:
        """The commands that make the file visible, for a caller's own transaction."""
        keys, ttl = self.store.keys, self.store.ttl_s
        content = keys.file_content(self.file_id)
        if record.bytes:
            pipe.rename(keys.file_upload(self.file_id), content)
        else:
            pipe.set(content, b"")
        pipe.expire(content, ttl)
        pipe.hset(keys.file(self.file_id), mapping=record.mapping())
        pipe.expire(keys.file(self.file_id), ttl)
        pipe.zadd(keys.owner_files(self.owner), {self.file_id: record.created_at})

    async def abort(self) -> None:
        self._pending.clear()
        await self.store.redis.delete(self.store.keys.file_upload(self.file_id))


class FileStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_s: int,
                 upload_ttl_s: int = 3600) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self.upload_ttl_s = upload_ttl_s  # an abandoned upload key disappears after this

    def writer(self, owner: str, filename: str, purpose: str,
               file_id: str | None = None) -> FileWriter:
        return FileWriter(self, file_id or new_file_id(), owner, filename, purpose)

    async def find(self, file_id: str, owner: str) -> FileRecord | None:
        """The file if it exists and belongs to ``owner`` (else ``None``: a 404 either way)."""
        fields = await self.redis.hgetall(self.keys.file(file_id))
        if not fields:
            return None
        record = FileRecord.from_fields(fields)
        return record if record.owner == owner else None

    async def delete(self, file_id: str, owner: str) -> bool:
        record = await self.find(file_id, owner)
        if record is None:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.file(file_id), self.keys.file_content(file_id))
            pipe.zrem(self.keys.owner_files(owner), file_id)
            await pipe.execute()
        return True

    async def list(self, owner: str, *, purpose: str | None, limit: int,
                   after: str | None) -> tuple[list[FileRecord], bool]:
        """Newest first; ids whose file expired are dropped from the index on the way."""
        index = self.keys.owner_files(owner)
        start = 0
        if after:
            rank = await self.redis.zrevrank(index, after)
            start = 0 if rank is None else rank + 1
        records: list[FileRecord] = []
        while len(records) <= limit:
            ids = await self.redis.zrevrange(index, start, start + 2 * limit)
            if not ids:
                break
            start += len(ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hgetall(self.keys.file(file_id.decode()))
                rows = await pipe.execute()
            gone = [fid for fid, fields in zip(ids, rows, strict=True) if not fields]
            if gone:
                await self.redis.zrem(index, *gone)
            for fields in rows:
                if fields:
                    record = FileRecord.from_fields(fields)
                    if purpose is None or record.purpose == purpose:
                        records.append(record)
        return records[:limit], len(records) > limit

    async def iter_bytes(self, file_id: str, start: int = 0,
                         chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        """The content from ``start`` in pieces (GETRANGE); stops at the end or if deleted."""
        key = self.keys.file_content(file_id)
        offset = start
        while True:
            chunk: bytes = await self.redis.getrange(key, offset, offset + chunk_bytes - 1)
            if not chunk:
                return
            offset += len(chunk)
            yield chunk
            if len(chunk) < chunk_bytes:
                return
