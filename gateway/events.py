"""Live token delivery: one pub/sub subscription per gateway process, fanned out by request id.

Workers publish ``pack_events([...])`` batches on ``Keys.gateway_channel(gateway_id)``. The
dispatcher decodes each batch and puts every event into the ``Mailbox`` registered for its
request id. Mailboxes are registered before the request is enqueued, so no event is missed;
events for unknown ids (finished or abandoned requests) are dropped. Pub/sub may lose
batches (a reconnect, a slow subscriber cut off by Redis): ``gateway.reader`` notices the
gap in ``seq`` and reads the missing events from the job's event list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.tasks import cancel_and_wait
from shared.errors import ProtocolError
from shared.protocol import TokenEvent, unpack_events

logger = logging.getLogger("tokenfleet.gateway")

POLL_TIMEOUT_S = 1.0  # get_message wait; also bounds how late a health check can be
CLOSE_TIMEOUT_S = 5.0
RECONNECT_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0)


class Mailbox:
    """The events of one request, in arrival order; one reader."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[TokenEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: TokenEvent) -> None:
        self._items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout_s: float) -> TokenEvent | None:
        """The next event, or ``None`` after ``timeout_s`` without one."""
        if self._items:
            return self._items.popleft()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self._items.popleft() if self._items else None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Dispatcher:
    """Owns the gateway's pub/sub connection and routes events to mailboxes."""

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self.channel = channel
        self.is_subscribed = False
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._mailboxes: dict[str, Mailbox] = {}
        self._task: asyncio.Task[None] | None = None
        self._is_closing = False

    async def start(self) -> None:
        """Subscribe (before the gateway serves anything) and start routing.

        If Redis is down now, the gateway still starts (``/readyz`` says why it is not
        ready) and the routing task keeps trying to subscribe.
        """
        try:
            await self._pubsub.subscribe(self.channel)
            self.is_subscribed = True
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            logger.warning("cannot subscribe to %s yet: %s", self.channel, exc)
        self._task = asyncio.create_task(self._run(), name="tokenfleet-dispatcher")

    async def close(self) -> None:
        self._is_closing = True  # ends the loop within POLL_TIMEOUT_S if a cancel is lost
        if self._task is not None and not await cancel_and_wait(self._task, CLOSE_TIMEOUT_S):
            logger.warning("event dispatcher did not stop within %.0f s", CLOSE_TIMEOUT_S)
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    def register(self, request_id: str) -> Mailbox:
        mailbox = Mailbox()
        self._mailboxes[request_id] = mailbox
        return mailbox

    def unregister(self, request_id: str) -> None:
        self._mailboxes.pop(request_id, None)

    @property
    def num_mailboxes(self) -> int:
        """Live requests waiting on this gateway (``tokenfleet:gateway_open_requests``)."""
        return len(self._mailboxes)

    async def _run(self) -> None:
        failures = 0
        while not self._is_closing:
            try:
                if not self._pubsub.subscribed:
                    await self._pubsub.subscribe(self.channel)
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=POLL_TIMEOUT_S)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self.is_subscribed = False
                delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                if failures == 0:
                    logger.warning("event subscription lost (%s); reconnecting", exc)
                failures += 1
                await asyncio.sleep(delay)
                continue
            except Exception:  # never let the one routing task die
                logger.exception("event dispatcher error; continuing")
                await asyncio.sleep(RECONNECT_BACKOFF_S[-1])
                continue
            if failures:
                logger.info("event subscription restored after %d attempts", failures)
                failures = 0
            self.is_subscribed = True
            if message is not None and message.get("type") == "message":
                self.deliver(message["data"])

    def deliver(self, data: bytes) -> None:
        """Route one published batch (public for tests)."""
        try:
            events = unpack_events(data)
        except ProtocolError as exc:
            logger.warning("dropped a malformed event batch on %s: %s", self.channel, exc)
            return
        mailboxes = self._mailboxes
        for event in events:
            mailbox = mailboxes.get(event.id)
            if mailbox is not None:
                mailbox.put(event)
