"""Stopping asyncio tasks reliably, even when a cancellation gets lost.

On Python < 3.12, ``asyncio.wait_for`` swallows a cancellation that arrives in the loop
iteration in which the operation it waits for completes (python/cpython#86296, fixed in
3.12 by building ``wait_for`` on ``asyncio.timeout``). redis-py sends every command through
``asyncio.wait_for`` when a socket timeout is set, so a task cancelled while it writes to
Redis can simply carry on. One ``task.cancel()`` followed by ``await task`` then hangs for
good on a loop like ``while True: await redis...``. ``cancel_and_wait`` cancels again until
the task is done (as anyio's level-triggered cancellation does), within a bound.
"""

from __future__ import annotations

import asyncio
from typing import Any

RECANCEL_INTERVAL_S = 0.05


async def cancel_and_wait(task: asyncio.Task[Any], timeout_s: float) -> bool:
    """Cancel ``task`` until it is done; False if it still runs after ``timeout_s``.

    Never raises the task's own exception; read it with ``task.exception()`` if needed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(RECANCEL_INTERVAL_S, remaining))
    return True


def failure(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception a finished task raised (marking it retrieved); None if cancelled."""
    return None if task.cancelled() else task.exception()
