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


CAPABILITY_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16",
                    "amx_bf16": "AMX"}


def cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_capability() -> dict[str, Any]:
    """What the CPU can do for the matmuls: its vector/matrix extensions from
    ``/proc/cpuinfo``, the instruction set torch dispatches to (``ATEN_CPU_CAPABILITY`` can
    lower it) and whether bf16 runs natively, as ``TOKENFLEET_DTYPE=auto`` decides it."""
    from worker.engine.loader import cpu_has_bf16, torch_cpu_capability

    flags = cpu_flags()
    return {"cpu_flags": {name: flag in flags for flag, name in CAPABILITY_FLAGS.items()},
            "torch_cpu_capability": torch_cpu_capability(), "cpu_bf16": cpu_has_bf16()}


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
            "commit": git_commit(), **cpu_capability()}


def capability_text(mach: dict[str, Any]) -> str:
    """``AVX2 yes, AVX-512 yes, AVX512-BF16 no, AMX no; torch uses AVX2`` (report header)."""
    flags = mach.get("cpu_flags") or {}
    parts = [f"{name} {'yes' if flags.get(name) else 'no'}" for name in CAPABILITY_FLAGS.values()]
    isa = mach.get("torch_cpu_capability")
    return ", ".join(parts) + (f"; torch dispatches to {isa}" if isa else "")


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
