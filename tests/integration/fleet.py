"""Start a real fleet for tests: Redis, gateway and workers as separate processes, run by
``tokenfleet.supervisor`` (the supervisor of ``tokenfleet up`` and the bench)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import RedisServer, free_port
from tokenfleet.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 30.0


@dataclass
class Fleet:
    redis: RedisServer
    supervisor: Supervisor
    log_dir: Path
    port: int = 0
    gateway: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return self.supervisor.env

    @property
    def workers(self) -> list[subprocess.Popen[bytes]]:
        """Every worker started so far (dead ones too), in start order."""
        return [c.proc for c in self.supervisor.children if c.name.startswith("worker")]

    def start_gateway(self, processes: int = 1) -> None:
        """The gateway; ``processes`` > 1: ``tokenfleet gateway --workers N``."""
        self.port = self.port or free_port()
        flags = ["--workers", str(processes)] if processes > 1 else []
        child = self.supervisor.start_role("gateway", "gateway", *flags,
                                           extra_env={"TOKENFLEET_PORT": str(self.port)})
        self.gateway = child.proc

    def start_worker(self, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        name = f"worker{len(self.workers)}"
        return self.supervisor.start_role(name, "worker", extra_env=extra).proc

    def wait_ready(self, num_workers: int = 1, timeout_s: float = 120.0) -> None:
        """Until the gateway counts ``num_workers`` ready workers; fails at once with the
        log of a fleet process that exits meanwhile."""
        self.supervisor.wait_ready(self.url, num_workers, timeout_s)

    def stop(self) -> None:
        """Gateway and workers first (SIGTERM, then SIGKILL after 30 s), Redis last."""
        self.supervisor.stop()


def make_fleet(tmp: Path, **env: str) -> Fleet:
    redis = RedisServer(tmp / "redis")
    redis.data_dir.mkdir(parents=True)
    redis.start()
    base = dict(os.environ)
    base.update({
        "TOKENFLEET_REDIS_URL": redis.url,
        "TOKENFLEET_KEY_PREFIX": "tfe2e",
        "PYTHONUNBUFFERED": "1",
        "TOKENFLEET_LOG_LEVEL": "INFO",
    })
    base.update(env)
    supervisor = Supervisor(base, log_dir=tmp, cwd=REPO, stop_timeout_s=STOP_TIMEOUT_S,
                            redis=redis)
    return Fleet(redis=redis, supervisor=supervisor, log_dir=tmp)


@contextlib.contextmanager
def running_fleet(tmp: Path, num_workers: int = 1, **env: str) -> Iterator[Fleet]:
    """``make_fleet`` with a gateway and ``num_workers`` workers started and ready; the
    whole fleet is stopped on exit (a module fixture's ``with ... as fleet: yield fleet``)."""
    fleet = make_fleet(tmp, **env)
    try:
        fleet.start_gateway()
        for _ in range(num_workers):
            fleet.start_worker()
        fleet.wait_ready(num_workers=num_workers)
        yield fleet
    finally:
        fleet.stop()
