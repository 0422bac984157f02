"""A throw-away local fleet for the full-path and bus benchmarks: a private redis-server
(no persistence), one gateway and N workers, each a real process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` from ``/proc/<pid>/stat`` (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cores_used(before: dict[str, float], after: dict[str, float], wall_s: float,
               ) -> dict[str, float]:
    """CPU-seconds per wall second of each process between two ``cpu_seconds`` readings."""
    if wall_s <= 0:
        return {}
    return {name: round((after[name] - before[name]) / wall_s, 2)
            for name in after if name in before}


class LocalFleet:
    def __init__(self, env: dict[str, str], workers: int = 1, prefix: str = "tfbench") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tokenfleet-bench-"))
        self.redis_port, self.port = free_port(), free_port()
        self.prefix = prefix
        self.num_workers = workers
        self.env = dict(os.environ, **env, TOKENFLEET_REDIS_URL=self.redis_url,
                        TOKENFLEET_KEY_PREFIX=prefix, TOKENFLEET_PORT=str(self.port),
                        TOKENFLEET_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalFleet:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self._spawn("redis", [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(self.dir)])
        self._spawn("gateway", [sys.executable, "-m", "shared.cli", "gateway"])
        for i in range(self.num_workers):
            self._spawn(f"worker{i}", [sys.executable, "-m", "shared.cli", "worker"])
        self._wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        self.procs.append(subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT))
        self.names.append(name)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by each fleet process and by this one (the
        load generator), from ``/proc``; a process that cannot be read is left out."""
        times = os.times()
        out = {"loadgen": times.user + times.system}
        for name, proc in zip(self.names, self.procs, strict=True):
            seconds = process_cpu_seconds(proc.pid)
            if seconds is not None:
                out[name] = seconds
        return out

    def _wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                logs = "\n".join(f.read_text()[-2000:] for f in self.dir.glob("*.log"))
                raise RuntimeError(f"a fleet process exited early:\n{logs}")
            try:
                body = httpx.get(f"{self.url}/readyz", timeout=2).json()
                if body.get("workers", 0) >= self.num_workers:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"fleet not ready after {timeout_s} s (logs in {self.dir})")
