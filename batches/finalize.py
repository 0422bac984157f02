"""Write a batch's output and error files and give it its final status, in one commit.

The input is read again, in order, and each line's stored result is looked up by its
``custom_id`` (HMGET in chunks), so the output follows the input's order and holds every
``custom_id`` at most once; a request that never ran in an expired batch gets OpenAI's
``batch_expired`` line in the error file. The files are written to upload keys and made
visible in the same transaction that sets the final status (guarded by WATCH on the
lease): a kill during finalizing leaves nothing visible and the next slice starts over.
"""

from __future__ import annotations

import json
import time

from redis.exceptions import WatchError

from batches import lines as out
from batches.files import PURPOSE_OUTPUT, FileStore, FileWriter
from batches.input import is_blank, iter_lines
from batches.lease import LeaseLost
from batches.records import Records
from batches.store import CANCELLED, COMPLETED, EXPIRED, FINALIZING
from gateway.state import GatewayState

CHUNK_LINES = 512
COMMIT_TRIES = 5


def output_file_ids(batch_id: str) -> tuple[str, str]:
    """Fixed per batch, so a finalize that starts over overwrites its own leftovers."""
    suffix = batch_id.removeprefix("batch_")
    return f"file-{suffix}-output", f"file-{suffix}-errors"


async def finalize(gw: GatewayState, files: FileStore, records: Records, batch_id: str,
                   owner: str, input_file_id: str, stopping: str | None) -> str:
    """``stopping``: ``cancelled``/``expired`` when the batch was stopped, else ``None``."""
    status = stopping or COMPLETED
    now = int(time.time())
    if stopping is None:
        await records.set(status=FINALIZING, finalizing_at=now)
    output_id, error_id = output_file_ids(batch_id)
    output = files.writer(owner, f"{batch_id}_output.jsonl", PURPOSE_OUTPUT, output_id)
    errors = files.writer(owner, f"{batch_id}_errors.jsonl", PURPOSE_OUTPUT, error_id)
    await output.abort()
    await errors.abort()
    num_unrun = await _write(gw, records, input_file_id, output, errors, status)
    await output.flush()
    await errors.flush()
    await _commit(gw, records, batch_id, status, output, errors, num_unrun)
    return status


async def _write(gw: GatewayState, records: Records, input_file_id: str, output: FileWriter,
                 errors: FileWriter, status: str) -> int:
    num_unrun = 0
    chunk: list[str] = []

    async def flush() -> None:
        nonlocal num_unrun
        if not chunk:
            return
        stored = await gw.redis.hmget(records.results_key, chunk)
        for custom_id, result in zip(chunk, stored, strict=True):
            if result is not None:
                writer = output if result[:1] == out.OUTPUT else errors
                await writer.write(result[1:] + b"\n")
            elif status == EXPIRED:
                num_unrun += 1
                await errors.write(out.unfinished(
                    custom_id, "batch_expired", "This request could not be executed before "
                    "the completion window expired.") + b"\n")
            # cancelled: a request that never ran appears in neither file (as with OpenAI)
        chunk.clear()

    async for _, raw in iter_lines(output.store.iter_bytes(input_file_id),
                                   max_line_bytes=gw.settings.max_body_bytes + 1):
        if is_blank(raw):
            continue
        chunk.append(json.loads(raw)["custom_id"])  # validated before the batch ran
        if len(chunk) >= CHUNK_LINES:
            await flush()
    await flush()
    return num_unrun


async def _commit(gw: GatewayState, records: Records, batch_id: str, status: str,
                  output: FileWriter, errors: FileWriter, num_unrun: int) -> None:
    keys, lease = gw.keys, records.lease
    fields: dict[str, str] = {"status": status, f"{status}_at": str(int(time.time())),
                              "output_file_id": output.file_id if output.num_bytes else "",
                              "error_file_id": errors.file_id if errors.num_bytes else ""}
    if status == CANCELLED:
        fields["cancelled_at"] = fields.pop(f"{status}_at")
    for _ in range(COMMIT_TRIES):
        async with gw.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(lease.key)
                if (await pipe.get(lease.key) or b"").decode() != lease.token:
                    raise LeaseLost("the batch's lease was taken by another orchestrator")
                pipe.multi()
                for writer in (output, errors):
                    if writer.num_bytes:
                        writer.queue_commit(pipe, writer.record())
                pipe.hset(keys.batch(batch_id), mapping=fields)
                if num_unrun:
                    pipe.hincrby(keys.batch(batch_id), "failed", num_unrun)
                pipe.delete(keys.batch_results(batch_id), keys.batch_inflight(batch_id),
                            keys.batch_seen(batch_id))
                pipe.zrem(keys.active_batches, batch_id)
                pipe.expire(keys.batch(batch_id), gw.settings.batch_ttl_s)
                await pipe.execute()
                return
            except WatchError:  # our own heartbeat touched the lease: read it again
                continue
    raise LeaseLost("could not commit the batch's final status")
