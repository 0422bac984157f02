"""A fleet for batch tests: redis, gateway, a (slowed) null-engine worker and the batch
orchestrator, each a process; helpers to write input files and read outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from shared.keys import LANES, WORKER_GROUP, Keys
from tests.integration.fleet import REPO, Fleet, make_fleet

MODEL = "null-model"
PREFIX = "tfe2e"
KEYS = Keys(PREFIX)

# A worker whose null engine takes ``step_delay_s`` per step, so a batch stays in flight.
SLOW_WORKER = """
import sys
from shared.settings import Settings
from worker.main import setup_logging, run
from worker.null_engine import NullEngine, null_model_info

def build(settings):
    engine = NullEngine(settings.max_batch_size, settings.null_engine_tokens, {step_delay_s})
    return engine, null_model_info(settings.model_name)

settings = Settings()
setup_logging(settings)
sys.exit(run(settings, build=build))
"""

NULL_ENV = {"TOKENFLEET_ENGINE": "null", "TOKENFLEET_SERVED_MODEL_NAME": MODEL,
            "TOKENFLEET_COALESCE_MS": "5", "TOKENFLEET_HEARTBEAT_INTERVAL_S": "0.2",
            "TOKENFLEET_BATCH_LEASE_S": "1.5", "TOKENFLEET_BATCH_SLICE_S": "3"}


class BatchFleet:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.orchestrators: list[subprocess.Popen[bytes]] = []
        # started here, outside the fleet's supervisor (Fleet.workers is a fresh list of the
        # supervisor's children: appending to it kept nothing, and the suite left them running)
        self.slow_workers: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return self.fleet.url

    def start_slow_worker(self, step_delay_s: float, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.fleet.log_dir / "worker-slow.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-c", SLOW_WORKER.format(
            step_delay_s=step_delay_s)], cwd=REPO, env=dict(self.fleet.env, **env), stdout=log,
            stderr=subprocess.STDOUT)
        self.slow_workers.append(proc)
        return proc

    def start_orchestrator(self) -> subprocess.Popen[bytes]:
        log = open(self.fleet.log_dir / "orchestrator.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "batches", "orchestrator"], cwd=REPO,
                                env=self.fleet.env, stdout=log, stderr=subprocess.STDOUT)
        self.orchestrators.append(proc)
        return proc

    def cli(self, *argv: str, cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[
            str]:
        return subprocess.run([sys.executable, "-m", "batches", *argv, "--url", self.url],
                              cwd=cwd, env=dict(self.fleet.env, PYTHONPATH=str(REPO)),
                              capture_output=True, text=True, timeout=timeout_s)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.fleet.redis.url)

    def stop(self) -> None:
        for proc in [*self.orchestrators, *self.slow_workers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.fleet.stop()


def make_batch_fleet(tmp: Path, **env: str) -> BatchFleet:
    return BatchFleet(make_fleet(tmp, **{**NULL_ENV, **env}))


def chat_lines(n: int, max_tokens: int = 8, model: str | None = MODEL,
               prefix: str = "req") -> list[dict[str, Any]]:
    lines = []
    for i in range(n):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": f"question {i}"}],
                                "max_tokens": max_tokens}
        if model:
            body["model"] = model
        lines.append({"custom_id": f"{prefix}-{i}", "method": "POST",
                      "url": "/v1/chat/completions", "body": body})
    return lines


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def backlog(client: redis.Redis, model: str = MODEL) -> int:
    """Requests of ``model`` waiting or held by workers, over both lanes."""
    total = 0
    for lane in LANES:
        stream = KEYS.requests_stream(model, lane)
        if not client.exists(stream):
            continue
        for group in client.xinfo_groups(stream):
            name = group["name"]
            if (name.decode() if isinstance(name, bytes) else name) == WORKER_GROUP:
                total += int(group["pending"]) + int(group.get("lag") or 0)
    return total
