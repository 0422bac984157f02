"""Mailboxes and the event dispatcher's routing (no Redis connection is made)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gateway.events import Dispatcher, Mailbox
from shared.protocol import EVENT_DONE, EVENT_TOKEN, TokenEvent, pack_events


async def test_mailbox_keeps_order_and_times_out() -> None:
    mailbox = Mailbox()
    assert await mailbox.get(0.01) is None
    first, second = TokenEvent("a", 0, EVENT_TOKEN, text="x"), TokenEvent("a", 1, EVENT_DONE)
    mailbox.put(first)
    mailbox.put(second)
    assert await mailbox.get(1) is first
    assert await mailbox.get(1) is second


async def test_mailbox_wakes_a_waiting_reader() -> None:
    mailbox = Mailbox()
    event = TokenEvent("a", 0, EVENT_TOKEN)
    asyncio.get_running_loop().call_later(0.01, mailbox.put, event)
    assert await mailbox.get(5) is event


async def test_dispatcher_routes_by_id_and_drops_the_rest() -> None:
    dispatcher = Dispatcher(aioredis.Redis(), "tf:events:test")
    a, b = dispatcher.register("a"), dispatcher.register("b")
    dispatcher.deliver(pack_events([TokenEvent("a", 0, EVENT_TOKEN, text="1"),
                                    TokenEvent("b", 0, EVENT_TOKEN, text="2"),
                                    TokenEvent("gone", 0, EVENT_TOKEN, text="3")]))
    assert (await a.get(0)).text == "1"  # type: ignore[union-attr]
    assert (await b.get(0)).text == "2"  # type: ignore[union-attr]
    dispatcher.unregister("a")
    dispatcher.deliver(pack_events([TokenEvent("a", 1, EVENT_DONE)]))
    assert await a.get(0) is None
    dispatcher.deliver(pack_events([TokenEvent("b", 1, EVENT_DONE)]))
    assert (await b.get(0)).type == EVENT_DONE  # type: ignore[union-attr]


async def test_dispatcher_drops_malformed_batches() -> None:
    dispatcher = Dispatcher(aioredis.Redis(), "tf:events:test")
    box = dispatcher.register("a")
    dispatcher.deliver(b"\x93\x01\x02")  # a msgpack list of ints: not events
    dispatcher.deliver(b"\xc1")  # not msgpack at all
    assert await box.get(0) is None
    dispatcher.deliver(pack_events([TokenEvent("a", 0, EVENT_TOKEN, text="ok")]))
    assert (await box.get(0)).text == "ok"  # type: ignore[union-attr]  # still routing
