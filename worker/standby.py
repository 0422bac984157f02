"""A standby worker (``TOKENFLEET_WORKER_STANDBY=true``): it starts, loads and warms its
model, then waits, heartbeating with state ``standby`` and reading nothing from the queue,
until SIGUSR1 promotes it. The autoscaler keeps such spares so that a scale-up from zero
skips the imports, the weights and the warm-up (docs/benchmarks.md, cold start).

SIGUSR1 may arrive while the model still loads: it is remembered. SIGTERM while waiting
exits cleanly (nothing was taken from the queue, nothing to drain).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)

STATE_STANDBY = "standby"
POLL_S = 0.05  # how often the wait looks at the shutdown flag


class Promotion:
    """Set by SIGUSR1 (install it at process start, before the model loads)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_signal)

    def promote(self) -> None:
        self._event.set()

    @property
    def is_promoted(self) -> bool:
        return self._event.is_set()

    def wait(self, should_stop: Callable[[], bool]) -> bool:
        """Until promoted (-> True) or ``should_stop()`` turns true (-> False)."""
        while not self._event.wait(POLL_S):
            if should_stop():
                return False
        return True

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._event.set()  # a signal handler: set the flag only
