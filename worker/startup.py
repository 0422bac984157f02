"""Where a worker's cold start goes: marks from the process's own start (read from
``/proc``, so the interpreter's start-up and imports count) to "serving".

Stages, in order: ``imports`` (interpreter + tokenfleet's modules, up to ``worker.main``),
``torch_import`` (torch and transformers), ``weights`` (resolve + load the checkpoint),
``warmup`` (one short request through prefill and decode), ``standby`` (only for a standby
worker: the wait for its promotion), ``serving`` (consumer groups and model info in Redis:
the loop is ready). Each is logged in one line at the end and exposed as
``tokenfleet:worker_startup_seconds{stage}``; docs/benchmarks.md has measured numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

STAGES = ("imports", "torch_import", "weights", "warmup", "standby", "serving")


def process_started_at() -> float | None:
    """Unix time this process started: ``/proc/self/stat`` field 22 (clock ticks after
    boot) against ``/proc/uptime`` now (both 10 ms; ``btime`` is whole seconds)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    return time.time() - (uptime_s - ticks / os.sysconf("SC_CLK_TCK"))


class StartupClock:
    def __init__(self, on_stage: Callable[[str, float], None] | None = None) -> None:
        self.started_at = process_started_at() or time.time()
        self._last = self.started_at
        self.stages: dict[str, float] = {}
        self.on_stage = on_stage

    def mark(self, stage: str) -> None:
        """``stage`` just ended (its time is since the previous mark)."""
        now = time.time()
        self.stages[stage] = max(0.0, now - self._last)
        self._last = now
        if self.on_stage is not None:
            self.on_stage(stage, self.stages[stage])
        if stage == STAGES[-1]:
            parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.stages.items())
            logger.info("cold start %.2f s from process start: %s",
                        now - self.started_at, parts)
