"""Start a real fleet for tests: redis-server, gateway and workers as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Fleet:
    redis: RedisServer
    env: dict[str, str]
    log_dir: Path
    port: int = 0
    gateway: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, role: str, name: str, extra: dict[str, str] | None = None,
               ) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        env = dict(self.env, **(extra or {}))
        return subprocess.Popen([sys.executable, "-m", "shared.cli", role], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def start_gateway(self) -> None:
        self.port = self.port or free_port()
        self.gateway = self._spawn("gateway", "gateway", {"TOKENFLEET_PORT": str(self.port)})

    def start_worker(self, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = self._spawn("worker", f"worker{len(self.workers)}", extra)
        self.workers.append(proc)
        return proc

    def wait_ready(self, num_workers: int = 1, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                body = httpx.get(f"{self.url}/readyz", timeout=2).json()
                if body.get("workers", 0) >= num_workers:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            for proc in [self.gateway, *self.workers]:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"a fleet process exited early; logs in {self.log_dir}")
            time.sleep(0.25)
        raise TimeoutError(f"fleet not ready in {timeout_s} s; logs in {self.log_dir}")

    def stop(self) -> None:
        procs = [p for p in [self.gateway, *self.workers] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.redis.stop()


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
    return Fleet(redis=redis, env=base, log_dir=tmp)
