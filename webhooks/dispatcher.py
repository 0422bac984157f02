"""The dispatcher loop: webhook events from the stream to their receivers, at least once.

State in Redis (``shared.keys``), so any number of dispatchers share the work and a killed
one loses nothing:

1. **Intake.** ``XREADGROUP`` (group ``WEBHOOK_GROUP``) takes new events; each is put in the
   due set (``Keys.webhook_due``, score = when its next attempt is due: now) and
   acknowledged in one transaction. An event read by a dispatcher that died before that
   stays pending in the group and is taken over (``XAUTOCLAIM``) after ``RECOVER_IDLE_MS``.
   The event itself stays in the stream until it is delivered or dead-lettered.
2. **Claim.** A script takes the events that are due and moves each one's due time to the
   end of a lease (the delivery timeout plus a margin), so no other dispatcher takes it
   meanwhile, and a dispatcher killed mid-delivery only delays it to the lease's end.
3. **Deliver** (``webhooks.delivery``), up to ``MAX_IN_FLIGHT`` at once.
4. **Record.** Delivered: the event leaves the due set, the attempt counter and the stream
   (one transaction). Failed: a script counts the attempt and either makes the event due
   again after an exponential backoff with jitter (``webhook_retry_base_s`` x 2^(n-1), capped
   at ``RETRY_MAX_S``, then a random point in its upper half) or, at
   ``TOKENFLEET_WEBHOOK_MAX_ATTEMPTS``, moves it to the dead-letter stream
   (``Keys.webhook_dead``: event, job, URL, attempts, last error, body), atomically.

Redis trouble (down, OOM, read-only) pauses the loop with backoff; nothing is lost, since an
event leaves Redis only once its outcome is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from shared.keys import WEBHOOK_GROUP, Keys
from shared.settings import Settings
from webhooks.delivery import deliver, make_client
from webhooks.events import WebhookEvent, decode_event
from webhooks.signing import Signer

logger = logging.getLogger("tokenfleet.webhooks")

READ_COUNT = 100
READ_BLOCK_MS = 100
MAX_IN_FLIGHT = 64
LEASE_MARGIN_S = 10.0
RETRY_MAX_S = 3600.0
RECOVER_EVERY_S = 5.0
RECOVER_IDLE_MS = 30_000  # an event read this long ago and not yet scheduled was orphaned
DEAD_MAXLEN = 100_000
REDIS_BACKOFF_MAX_S = 5.0

# KEYS: due set. ARGV: now, lease end, count. Returns the ids now leased to the caller.
CLAIM_DUE_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id) end
return ids
"""

# A failed attempt. KEYS: due set, attempts hash, event stream, dead-letter stream.
# ARGV: 1 entry id, 2 max attempts, 3 next due time, 4 dead maxlen, 5.. dead-letter fields.
# Returns the attempts so far (due again), minus them (dead-lettered), or 0 when the event
# is no longer due here (another dispatcher recorded it after a lease ran out).
FAIL_LUA = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
if n < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return n
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'attempts', n, unpack(ARGV, 5, #ARGV))
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('XDEL', KEYS[3], ARGV[1])
return -n
"""


def backoff_s(failures: int, base_s: float, rng: random.Random) -> float:
    """Delay after the ``failures``-th failed attempt: exponential, capped, jittered (a
    uniform point in the upper half, so retries of a burst spread out)."""
    ceiling = min(RETRY_MAX_S, base_s * 2 ** (failures - 1))
    return rng.uniform(ceiling / 2, ceiling)


class WebhookDispatcher:
    def __init__(self, settings: Settings, redis: aioredis.Redis, *,
                 client: httpx.AsyncClient | None = None, consumer: str | None = None,
                 rng: random.Random | None = None) -> None:
        if settings.webhook_secret is None:
            raise ValueError("the webhook dispatcher needs TOKENFLEET_WEBHOOK_SECRET")
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.consumer = consumer or f"dispatcher-{secrets.token_hex(6)}"
        self.signer = Signer(settings.webhook_secret)
        self.client = client or make_client(settings.webhook_timeout_s)
        self.rng = rng or random.Random()
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self.in_flight: set[asyncio.Task[None]] = set()
        self.num_delivered = 0
        self.num_failed_attempts = 0
        self.num_dead = 0
        self._claim = redis.register_script(CLAIM_DUE_LUA)
        self._fail = redis.register_script(FAIL_LUA)
        self._last_recover = 0.0
        self._has_group = False

    # --- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until ``stop`` is set, then let deliveries in flight finish (up to the
        delivery timeout; the rest are leased and retried by whoever runs next)."""
        logger.info("webhook dispatcher %s started", self.consumer)
        failures = 0
        while not stop.is_set():
            try:
                await self.turn()
                if failures:
                    logger.info("Redis serves the webhook dispatcher again")
                failures = 0
            except RedisError as exc:
                failures += 1
                if failures == 1:
                    logger.warning("Redis trouble, dispatching paused: %s", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    delay = min(REDIS_BACKOFF_MAX_S, 0.1 * 2 ** min(failures, 6))
                    await asyncio.wait_for(stop.wait(), delay)
        await self.drain(self.settings.webhook_timeout_s + 1.0)
        logger.info("webhook dispatcher %s stopped: %d delivered, %d failed attempts, "
                    "%d dead-lettered", self.consumer, self.num_delivered,
                    self.num_failed_attempts, self.num_dead)

    async def turn(self) -> None:
        """One pass: recover orphans (now and then), take new events, start due ones."""
        if not self._has_group:
            await self.ensure_group()
            self._has_group = True
        if time.monotonic() - self._last_recover >= RECOVER_EVERY_S:
            await self.recover()
            self._last_recover = time.monotonic()
        await self.intake(READ_BLOCK_MS)
        await self.dispatch_due()

    async def drain(self, timeout_s: float) -> None:
        if not self.in_flight:
            return
        _, pending = await asyncio.wait(set(self.in_flight), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # --- intake -------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.webhook_events, WEBHOOK_GROUP, id="0",
                                           mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def intake(self, block_ms: int | None) -> int:
        """New events into the due set; returns how many."""
        stream = self.keys.webhook_events
        try:
            reply = await self.redis.xreadgroup(WEBHOOK_GROUP, self.consumer, {stream: ">"},
                                                count=READ_COUNT, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._has_group = False  # Redis lost it (a restart without persistence)
            return 0
        ids = [entry_id for _, entries in reply or [] for entry_id, _ in entries]
        await self._schedule(ids)
        return len(ids)

    async def recover(self) -> None:
        """Events read by a dispatcher that died before scheduling them."""
        claimed = await self.redis.xautoclaim(  # with justid, redis-py gives the ids alone
            self.keys.webhook_events, WEBHOOK_GROUP, self.consumer, RECOVER_IDLE_MS,
            start_id="0-0", count=READ_COUNT, justid=True)
        if claimed:
            logger.info("took over %d webhook events left unscheduled", len(claimed))
            await self._schedule(list(claimed))

    async def _schedule(self, ids: list[bytes]) -> None:
        if not ids:
            return
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self.keys.webhook_due, dict.fromkeys(ids, now), nx=True)
            pipe.xack(self.keys.webhook_events, WEBHOOK_GROUP, *ids)
            await pipe.execute()

    # --- delivery -----------------------------------------------------------------------

    async def dispatch_due(self) -> int:
        """Lease the events that are due and start delivering them; returns how many."""
        room = MAX_IN_FLIGHT - len(self.in_flight)
        if room <= 0:
            return 0
        now = time.time()
        ids = await self._claim(keys=[self.keys.webhook_due],
                                args=[repr(now), repr(now + self.lease_s), room])
        if not ids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(self.keys.webhook_events, entry_id, entry_id)
                pipe.hget(self.keys.webhook_attempts, entry_id)
            replies = await pipe.execute()
        for entry_id, entries, attempts in zip(ids, replies[::2], replies[1::2], strict=True):
            event = decode_event(self.keys, entry_id.decode(), entries[0][1]) if entries else None
            if event is None:
                await self._forget(entry_id)  # trimmed, or not an event: nothing to send
                continue
            task = asyncio.create_task(self._attempt(event, int(attempts or 0)),
                                       name=f"webhook-{event.message_id}")
            self.in_flight.add(task)
            task.add_done_callback(self._finished)
        return len(ids)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("webhook task %s failed: %r (retried after its lease)",
                           task.get_name(), task.exception())

    async def _attempt(self, event: WebhookEvent, failures_before: int) -> None:
        error = await deliver(self.client, self.signer, event,
                              allow_private=self.settings.webhook_allow_private,
                              timeout_s=self.settings.webhook_timeout_s)
        if error is None:
            await self._forget(event.entry_id.encode())
            self.num_delivered += 1
            return
        self.num_failed_attempts += 1
        await self._record_failure(event, failures_before + 1, error)

    async def _forget(self, entry_id: bytes) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.webhook_due, entry_id)
            pipe.hdel(self.keys.webhook_attempts, entry_id)
            pipe.xdel(self.keys.webhook_events, entry_id)
            await pipe.execute()

    async def _record_failure(self, event: WebhookEvent, failures: int, error: str) -> None:
        keys = self.keys
        next_due = time.time() + backoff_s(failures, self.settings.webhook_retry_base_s,
                                           self.rng)
        dead = ["event", event.event, "job", event.job_id, "url", event.url,
                "webhook_id", event.message_id, "error", error, "body", event.body]
        result = await self._fail(
            keys=[keys.webhook_due, keys.webhook_attempts, keys.webhook_events,
                  keys.webhook_dead],
            args=[event.entry_id, self.settings.webhook_max_attempts, repr(next_due),
                  DEAD_MAXLEN, *dead])
        if result < 0:
            self.num_dead += 1
            logger.warning("webhook %s for job %s to %s dead-lettered after %d attempts: %s",
                           event.event, event.job_id, event.url, -result, error)
        elif result > 0:
            logger.info("webhook %s for job %s: attempt %d failed (%s); next in %.1f s",
                        event.event, event.job_id, result, error, next_due - time.time())
