"""The batch slice's lease heartbeat stops even when a cancellation is swallowed mid-refresh
(the stall a 2,000-line benchmark batch hit: a slice waited for ever on its heartbeat)."""

from __future__ import annotations

import asyncio
import contextlib

from batches.worker import LeaseHeartbeat


class SwallowingLease:
    """A lease whose refresh swallows a cancel that lands during it, as a Redis read can
    when the cancel and the reply arrive together."""

    key = "lease"

    def __init__(self) -> None:
        self.refreshes = 0
        self.in_refresh = asyncio.Event()

    async def refresh(self) -> bool:
        self.refreshes += 1
        self.in_refresh.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
        return True


def test_stop_returns_even_if_the_refresh_swallows_the_cancel() -> None:
    async def scenario() -> tuple[int, int, bool]:
        lease = SwallowingLease()
        heartbeat = LeaseHeartbeat(lease, interval_s=0.01)  # type: ignore[arg-type]
        await asyncio.wait_for(lease.in_refresh.wait(), 5)  # stop lands inside a refresh
        await asyncio.wait_for(heartbeat.stop(), 2)
        after_stop = lease.refreshes
        await asyncio.sleep(0.2)  # a heartbeat still alive would refresh ~20 more times
        return after_stop, lease.refreshes, heartbeat._task.done()

    after_stop, later, done = asyncio.run(scenario())
    assert done
    assert later == after_stop


def test_it_refreshes_until_stopped() -> None:
    async def scenario() -> int:
        lease = SwallowingLease()
        heartbeat = LeaseHeartbeat(lease, interval_s=0.01)  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        await heartbeat.stop()
        return lease.refreshes

    assert asyncio.run(scenario()) >= 3
