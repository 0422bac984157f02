"""What the run ran on, and how busy the machine was with other work meanwhile."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """``git describe --always --dirty`` of the checkout ("" outside git)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                              capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
            "commit": git_commit(), "cpu_bf16": _has_flag("avx512_bf16") or _has_flag("amx_bf16")}


def _has_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _busy_seconds() -> float | None:
    """CPU-seconds the whole machine spent busy since boot (``/proc/stat``; steal excluded)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in first[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU-seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(slots=True)
class ForeignLoad:
    """Measures how many cores other processes (not the bench or its fleets) kept busy."""

    busy0: float | None = None
    own0: float = 0.0
    wall0: float = 0.0

    def start(self) -> None:
        self.busy0, self.own0 = _busy_seconds(), _own_seconds()
        self.wall0 = time.monotonic()

    def stop(self) -> dict[str, Any]:
        busy, wall = _busy_seconds(), time.monotonic() - self.wall0
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if busy is None or self.busy0 is None or wall <= 0:
            return {"foreign_cores": None, "loadavg_1m_end": load}
        foreign = (busy - self.busy0 - (_own_seconds() - self.own0)) / wall
        return {"foreign_cores": round(max(0.0, foreign), 2), "loadavg_1m_end": load}
