"""Stopping tasks whose cancellation gets lost (python/cpython#86296 in redis-py's sends)."""

from __future__ import annotations

import asyncio

from gateway.tasks import cancel_and_wait, failure


async def _swallows_cancels(times: int, stubborn: asyncio.Event | None = None) -> str:
    """Like a loop around a redis-py call on Python < 3.12: a cancel can vanish."""
    lost = 0
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if lost >= times and not (stubborn and stubborn.is_set()):
                raise
            lost += 1
            task = asyncio.current_task()
            getattr(task, "uncancel", lambda: 0)()  # 3.11+ counts cancels; 3.10 does not


async def test_a_lost_cancel_is_repeated_until_the_task_stops() -> None:
    task = asyncio.create_task(_swallows_cancels(times=3))
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, timeout_s=5)
    assert task.cancelled() and failure(task) is None


async def test_a_task_that_never_stops_is_reported_after_the_bound() -> None:
    stubborn = asyncio.Event()
    stubborn.set()
    task = asyncio.create_task(_swallows_cancels(0, stubborn))
    await asyncio.sleep(0)
    assert not await cancel_and_wait(task, timeout_s=0.2)
    assert not task.done()
    stubborn.clear()
    assert await cancel_and_wait(task, timeout_s=1)


async def test_an_exception_is_returned_not_raised() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(boom())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, timeout_s=1)
    assert isinstance(failure(task), ValueError)
