"""The orchestrator process: an arq worker running ``run_batch`` slices and a sweep cron.

``run_batch(batch_id)`` is the one arq job of a batch. Each run is a slice: it takes the
batch's lease (or, if another live slice holds it, retries after the lease's TTL), drives
the batch for up to ``TOKENFLEET_BATCH_SLICE_S`` and raises ``Retry(defer=0)``: the same job
runs again at the next poll, here or in another orchestrator. A slice that fails for any
other reason is retried with backoff, and after ``MAX_FAILURES`` the batch is marked failed.

``sweep`` (arq cron, every 10 s) expires batches: it re-queues the job of any batch still
active (a batch past its 24 h window then finalizes as ``expired`` even if it was stuck),
and deletes an arq in-progress key left by a process killed before its slice took the
lease. Files and finished batch records expire by their Redis TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from typing import Any

from arq import cron
from arq.worker import Retry, Worker, func

from batches.files import FileStore
from batches.lease import Lease, LeaseLost, arq_in_progress_key
from batches.orchestrator import BatchSlice
from batches.queue import RUN_BATCH, arq_redis, deserialize, enqueue_batch, serialize
from batches.queue import job_id as arq_job_id
from batches.store import FAILED, FINAL_STATUSES
from gateway.state import GatewayState
from gateway.tasks import cancel_and_wait, failure
from shared.keys import Keys
from shared.settings import Settings

logger = logging.getLogger("tokenfleet.batches")
STOP_GRACE_S = 5.0  # after SIGTERM, how long running slices get to stop

RUN_TIMEOUT_S = 900  # one slice; validation of a 100,000-line file included
IN_PROGRESS_TIMEOUT_MS = (RUN_TIMEOUT_S + 10) * 1000  # what arq sets, before we shorten it
MAX_FAILURES = 8
POLL_DELAY_S = 0.2


def build_gateway_state(settings: Settings) -> GatewayState:
    """The gateway's own state (catalog, backlog, job store), so lines take its path."""
    from gateway.app import _build_state

    return _build_state(settings)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    gw = build_gateway_state(settings)
    ctx["gw"] = gw
    ctx["files"] = FileStore(gw.redis, gw.keys, settings.file_ttl_s)


async def shutdown(ctx: dict[str, Any]) -> None:
    gw: GatewayState | None = ctx.get("gw")
    if gw is not None:
        await gw.redis.aclose()


async def run_batch(ctx: dict[str, Any], batch_id: str) -> str:
    gw: GatewayState = ctx["gw"]
    settings = gw.settings
    fields = await gw.redis.hgetall(gw.keys.batch(batch_id))
    status = fields.get(b"status", b"").decode()
    if not fields or status in FINAL_STATUSES:
        return status or "gone"
    lease = Lease(gw.redis, gw.keys.batch_lease(batch_id), ctx["job_id"], settings.batch_lease_s)
    if not await lease.acquire():
        raise Retry(defer=settings.batch_lease_s)  # a live slice elsewhere drives it
    heartbeat = LeaseHeartbeat(lease, settings.batch_lease_s / 3)
    try:
        fields = await gw.redis.hgetall(gw.keys.batch(batch_id))  # read under the lease
        return await BatchSlice(gw, ctx["files"], batch_id, lease, fields).run()
    except (Retry, LeaseLost):
        raise Retry(defer=0) from None
    except Exception as exc:
        return await _failed_slice(gw, batch_id, lease, exc)
    finally:
        await heartbeat.stop()
        with contextlib.suppress(Exception):
            await lease.release()


class LeaseHeartbeat:
    """Refreshes a slice's lease every ``interval_s`` until ``stop()``.

    It stops on a flag and is cancelled until it is done (``gateway.tasks``): a cancel that
    lands while a refresh's reply arrives can be swallowed inside the Redis client's read
    timeout (Python 3.11's ``wait_for``), and a heartbeat stopped by one cancel alone then
    keeps the lease (and arq's in-progress key) alive for ever, its batch stalled (seen in a
    2,000-line benchmark batch after about 70 slices).
    """

    def __init__(self, lease: Lease, interval_s: float) -> None:
        self.lease = lease
        self.interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
            if self._stopping.is_set():
                return
            if not await self.lease.refresh():
                logger.warning("lost the lease %s", self.lease.key)
                return

    async def stop(self) -> None:
        """Stop refreshing; returns within one refresh's time even if a cancel is lost."""
        self._stopping.set()
        if await cancel_and_wait(self._task, self.interval_s + 5.0):
            failure(self._task)  # a refresh's Redis error: the lease just expires


async def _failed_slice(gw: GatewayState, batch_id: str, lease: Lease, exc: Exception) -> str:
    key = gw.keys.batch(batch_id)
    failures = int(await gw.redis.hincrby(key, "orchestrator_failures", 1))
    logger.exception("batch %s: slice failed (%d of %d)", batch_id, failures, MAX_FAILURES,
                     exc_info=exc)
    if failures < MAX_FAILURES:
        raise Retry(defer=min(2 ** failures, 60)) from exc
    errors = {"object": "list", "data": [{
        "code": "orchestrator_error", "line": None, "param": None,
        "message": f"the batch could not be run: {type(exc).__name__}: {exc}"}]}
    async with gw.redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={"status": FAILED, "failed_at": str(int(time.time())),
                                "errors": json.dumps(errors)})
        pipe.zrem(gw.keys.active_batches, batch_id)
        pipe.expire(key, gw.settings.batch_ttl_s)
        await pipe.execute()
    return FAILED


async def sweep(ctx: dict[str, Any]) -> int:
    """Re-queue every active batch's job (a no-op when it exists); clear stale arq keys."""
    gw: GatewayState = ctx["gw"]
    keys: Keys = gw.keys
    arq = arq_redis(gw.redis, keys)
    queued = 0
    for raw_id in await gw.redis.zrange(keys.active_batches, 0, -1):
        batch_id = raw_id.decode()
        if not await gw.redis.exists(keys.batch(batch_id)):
            await gw.redis.zrem(keys.active_batches, batch_id)
            continue
        in_progress = arq_in_progress_key(arq_job_id(keys, batch_id))
        ttl_ms = await gw.redis.pttl(in_progress)
        age_ms = IN_PROGRESS_TIMEOUT_MS - ttl_ms
        lease_ms = gw.settings.batch_lease_s * 1000
        if ttl_ms > lease_ms and age_ms > 2 * lease_ms and not await gw.redis.exists(
                keys.batch_lease(batch_id)):
            logger.warning("batch %s: clearing the in-progress key of a dead slice", batch_id)
            await gw.redis.delete(in_progress)
        queued += await enqueue_batch(arq, keys, batch_id)
    return queued


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq's ``WorkerSettings`` for this deployment, as keyword arguments of ``Worker``."""
    return {
        "functions": [func(run_batch, name=RUN_BATCH, timeout=RUN_TIMEOUT_S,
                           max_tries=1_000_000_000, keep_result=0)],
        "cron_jobs": [cron(sweep, name="sweep", second=set(range(0, 60, 10)),
                           run_at_startup=True, timeout=60, unique=True)],
        "queue_name": Keys(settings.key_prefix).arq_queue,
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings},
        "poll_delay": POLL_DELAY_S,
        "max_jobs": settings.batch_orchestrator_jobs,
        "job_timeout": RUN_TIMEOUT_S,
        "keep_result": 0,
        "health_check_interval": 10,
    }


async def _serve(settings: Settings) -> None:
    from shared.redis_conn import async_client

    redis = async_client(settings)
    arq = arq_redis(redis, Keys(settings.key_prefix))
    worker = Worker(redis_pool=arq, handle_signals=False, **worker_settings(settings))
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        """arq's own stop (cancel the running slices), then a hard exit if a slice does not
        end within ``STOP_GRACE_S``: a cancellation can be swallowed mid-call (Python 3.11's
        ``wait_for``), and nothing is lost by exiting, because a slice's work is in Redis
        under a lease that the next orchestrator takes over (as after kill -9)."""
        worker.handle_sig(signum)
        loop.call_later(STOP_GRACE_S, _exit_now, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.async_run()
    finally:
        await worker.close()


def _exit_now(signum: signal.Signals) -> None:
    logger.warning("a batch slice did not stop within %.0f s of %s; exiting now (its batch "
                   "resumes under the next orchestrator)", STOP_GRACE_S,
                   signal.Signals(signum).name)
    os._exit(0)


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT (arq finishes or cancels running slices; they resume)."""
    logger.info("batch orchestrator starting (queue %s)", Keys(settings.key_prefix).arq_queue)
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(_serve(settings))
    return 0
