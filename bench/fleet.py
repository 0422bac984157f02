"""A throw-away local fleet for the full-path and bus benchmarks: a private redis-server
(no persistence), one gateway (of one or more processes) and N workers, each a real
process, started and stopped by ``tokenfleet.supervisor`` (the same supervisor as
``tokenfleet up``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shared.settings import Settings
from tokenfleet.redis_server import find_redis_server, not_found_message
from tokenfleet.supervisor import RedisProcess, Supervisor, free_port
from tokenfleet.up import stop_timeout_s

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 180.0


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` from ``/proc/<pid>/stat`` (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (Linux ``/proc/<pid>/task/*/children``), sorted."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.update(int(child) for child in task.read_text().split())
        except (OSError, ValueError):
            continue
    return sorted(found)


def _is_helper(pid: int) -> bool:
    """multiprocessing's resource tracker (a helper of spawned processes, idle)."""
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def tree_cpu_seconds(pid: int) -> tuple[float | None, list[float]]:
    """CPU seconds of ``pid`` and its live descendants together, and of each direct child
    but multiprocessing's resource tracker (a multi-process gateway's processes);
    ``(None, [])`` if ``pid`` cannot be read."""
    own = process_cpu_seconds(pid)
    if own is None:
        return None, []
    total, per_child = own, []
    for child in child_pids(pid):
        seconds, _ = tree_cpu_seconds(child)
        if seconds is not None:
            total += seconds
            if not _is_helper(child):
                per_child.append(seconds)
    return total, per_child


def cores_used(before: dict[str, float], after: dict[str, float], wall_s: float,
               ) -> dict[str, float]:
    """CPU-seconds per wall second of each process between two ``cpu_seconds`` readings."""
    if wall_s <= 0:
        return {}
    return {name: round((after[name] - before[name]) / wall_s, 2)
            for name in after if name in before}


class LocalFleet:
    def __init__(self, env: dict[str, str], workers: int = 1, prefix: str = "tfbench",
                 extra_roles: tuple[str, ...] = (), gateway_processes: int = 1) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tokenfleet-bench-"))
        self.port = free_port()
        self.prefix = prefix
        self.num_workers = workers
        self.extra_roles = extra_roles  # e.g. ("orchestrator",): started after the workers
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError(not_found_message())
        self.redis = RedisProcess(binary, self.dir / "redis", aof=False)
        child_env = dict(os.environ, **env, TOKENFLEET_REDIS_URL=self.redis_url,
                         TOKENFLEET_KEY_PREFIX=prefix, TOKENFLEET_PORT=str(self.port),
                         TOKENFLEET_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1",
                         TOKENFLEET_GATEWAY_WORKERS=str(gateway_processes))
        self.supervisor = Supervisor(child_env, log_dir=self.dir, cwd=REPO,
                                     stop_timeout_s=stop_timeout_s(Settings()), redis=self.redis)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalFleet:
        try:
            self.redis.start()
            self.supervisor.start_role("gateway", "gateway")
            for i in range(self.num_workers):
                self.supervisor.start_role(f"worker{i}", "worker")
            for role in self.extra_roles:
                self.supervisor.start_role(role, role)
            self.supervisor.wait_ready(self.url, self.num_workers, READY_TIMEOUT_S)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.supervisor.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def pid(self, name: str) -> int | None:
        """The pid of child ``name`` (``gateway``, ``worker0``, ``orchestrator``...)."""
        return next((c.proc.pid for c in self.supervisor.children if c.name == name), None)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by each fleet process and by this one (the
        load generator), from ``/proc``; a process that cannot be read is left out. A
        process's live children count with it (a multi-process gateway), and each child is
        also listed as ``<name>.<n>`` when there are several."""
        times = os.times()
        out = {"loadgen": times.user + times.system}
        pids = {child.name: child.proc.pid for child in self.supervisor.children}
        if self.redis.proc is not None:
            pids["redis"] = self.redis.proc.pid
        for name, pid in pids.items():
            seconds, per_child = tree_cpu_seconds(pid)
            if seconds is None:
                continue
            out[name] = seconds
            if len(per_child) > 1:
                out.update({f"{name}.{n}": s for n, s in enumerate(per_child, start=1)})
        return out
