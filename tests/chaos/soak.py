"""Chaos soak: a real fleet under streaming and job traffic while processes die.

A Redis with AOF, two gateways and three null-engine workers (real processes, the real
queue loop) serve closed-loop clients that alternate streamed chat completions and jobs.
Meanwhile a chaos thread, in turn: kills a worker with SIGKILL (and starts a replacement),
restarts a gateway with SIGTERM, stops and restarts Redis, and pauses a worker with SIGSTOP
for longer than the claim idle time before SIGCONT.

At the end every request that got a 2xx must have its complete text exactly once (the null
engine's text is known in advance; a streamed client's text must equal the job's final
text), no job may stay queued or running, no process may have died outside the kills, and
a finished job must keep at most its text plus 1 KB in Redis once the replay window passed.

    python -m tests.chaos.soak --duration 600 --json soak.json   # the long run
    tests/integration/test_chaos_soak.py                       # a short run in CI
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from shared.keys import LANES, Keys
from tests.conftest import RedisServer, free_port
from worker.null_engine import word_token

REPO = Path(__file__).resolve().parents[2]
CLI_MODULE = "tokenfleet"
MODEL = "null-soak"
PREFIX = "tfsoak"
ACTIONS = ("kill_worker", "restart_gateway", "restart_redis", "pause_worker")
MEMORY_SLACK_BYTES = 1024
SETTLE_TIMEOUT_S = 120.0


@dataclass(slots=True)
class SoakConfig:
    duration_s: float = 60.0
    num_gateways: int = 2
    num_workers: int = 3
    num_clients: int = 6
    max_tokens: int = 40
    step_ms: float = 15.0  # null-engine compute per step: a request takes ~max_tokens steps
    chaos_interval_s: float = 5.0
    claim_idle_ms: int = 2000
    events_ttl_s: float = 2.0
    seed: int = 0


@dataclass(slots=True)
class Outcome:
    """One request a client made."""

    kind: str  # "stream" | "job"
    status: int | None = None  # HTTP status; None: no answer (connection refused, reset)
    id: str | None = None
    text: str = ""
    done: bool = False  # a stream reached [DONE]
    error: str | None = None  # an in-band error event after a 2xx


@dataclass(slots=True)
class Report:
    duration_s: float = 0.0
    requests_2xx: int = 0
    streams_2xx: int = 0
    jobs_2xx: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # status (or "no answer") -> count
    kills: int = 0
    gateway_restarts: int = 0
    redis_restarts: int = 0
    pauses: int = 0
    lost: list[str] = field(default_factory=list)  # 2xx but not succeeded, or text short
    duplicated: list[str] = field(default_factory=list)  # text longer than expected
    wrong_text: list[str] = field(default_factory=list)  # same length, other text
    stream_errors: list[str] = field(default_factory=list)  # error event after a 200
    stream_mismatch: list[str] = field(default_factory=list)  # stream text != job text
    stuck: list[str] = field(default_factory=list)  # still queued/running at the end
    crashes: list[str] = field(default_factory=list)  # processes that died on their own
    max_job_overhead_bytes: int = 0  # Redis bytes of a finished job beyond its text
    stream_entries_left: int = 0
    worst_job: str = ""  # the job with the largest overhead: its keys' sizes, events TTL
    timeline: list[str] = field(default_factory=list)  # "+12.3s kill_worker" ...

    @property
    def is_clean(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong_text or self.stream_errors
                    or self.stream_mismatch or self.stuck or self.crashes)


def expected_text(num_tokens: int) -> str:
    return "".join(word_token(i)[1] for i in range(num_tokens))


@dataclass
class Proc:
    role: str
    name: str
    popen: subprocess.Popen[bytes]
    port: int = 0
    is_deliberate_exit: bool = False


class Soak:
    def __init__(self, config: SoakConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.rng = random.Random(config.seed)
        self.redis = RedisServer(workdir / "redis")
        self.gateways: list[Proc] = []
        self.workers: list[Proc] = []
        self.dead: list[Proc] = []
        self.outcomes: list[Outcome] = []
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._num_spawned = 0

    # --- processes ----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        c = self.config
        env = dict(os.environ)
        env.update({
            "TOKENFLEET_REDIS_URL": self.redis.url,
            "TOKENFLEET_KEY_PREFIX": PREFIX,
            "TOKENFLEET_ENGINE": "null",
            "TOKENFLEET_SERVED_MODEL_NAME": MODEL,
            "TOKENFLEET_NULL_ENGINE_TOKENS": str(c.max_tokens),
            "TOKENFLEET_NULL_ENGINE_STEP_MS": str(c.step_ms),
            "TOKENFLEET_CLAIM_IDLE_MS": str(c.claim_idle_ms),
            "TOKENFLEET_EVENTS_TTL_S": str(c.events_ttl_s),
            "TOKENFLEET_HEARTBEAT_TTL_S": "3",
            "TOKENFLEET_GATEWAY_SHUTDOWN_DELAY_S": "0.2",
            "TOKENFLEET_GATEWAY_DRAIN_TIMEOUT_S": "30",
            "TOKENFLEET_DRAIN_TIMEOUT_S": "30",
            "TOKENFLEET_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def spawn(self, role: str, port: int = 0) -> Proc:
        self._num_spawned += 1
        name = f"{role}{self._num_spawned}"
        env = self.env()
        if port:
            env["TOKENFLEET_PORT"] = str(port)
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        popen = subprocess.Popen([sys.executable, "-m", CLI_MODULE, role], cwd=REPO, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        return Proc(role, name, popen, port)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        for _ in range(self.config.num_gateways):
            self.gateways.append(self.spawn("gateway", free_port()))
        for _ in range(self.config.num_workers):
            self.workers.append(self.spawn("worker"))
        for gw in self.gateways:
            self._wait_ready(gw, self.config.num_workers)

    def _wait_ready(self, gw: Proc, num_workers: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if gw.popen.poll() is not None:
                raise RuntimeError(f"{gw.name} exited early; see {self.workdir}/{gw.name}.log")
            try:
                body = httpx.get(f"http://127.0.0.1:{gw.port}/readyz", timeout=2).json()
                if body.get("workers", 0) >= num_workers:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{gw.name} not ready in {timeout_s} s; logs in {self.workdir}")

    def stop(self) -> None:
        self._stop.set()
        procs = [*self.gateways, *self.workers]
        for proc in procs:
            proc.is_deliberate_exit = True
            if proc.popen.poll() is None:
                os.kill(proc.popen.pid, signal.SIGCONT)
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self.redis.stop()

    # --- chaos --------------------------------------------------------------------------
    def _alive_workers(self) -> list[Proc]:
        return [w for w in self.workers if w.popen.poll() is None]

    def kill_worker(self) -> None:
        victim = self.rng.choice(self._alive_workers())
        victim.is_deliberate_exit = True
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait()
        self.workers.remove(victim)
        self.dead.append(victim)
        self.workers.append(self.spawn("worker"))
        self.report.kills += 1

    def restart_gateway(self) -> None:
        index = self.rng.randrange(len(self.gateways))
        old = self.gateways[index]
        old.is_deliberate_exit = True
        old.popen.send_signal(signal.SIGTERM)
        old.popen.wait(timeout=60)
        self.dead.append(old)
        new = self.spawn("gateway", old.port)
        self.gateways[index] = new
        self._wait_ready(new, 1)
        self.report.gateway_restarts += 1

    def restart_redis(self) -> None:
        self.redis.stop()
        time.sleep(1.0)
        self.redis.start()
        self.report.redis_restarts += 1

    def pause_worker(self) -> None:
        victim = self.rng.choice(self._alive_workers())
        victim.popen.send_signal(signal.SIGSTOP)
        time.sleep(self.config.claim_idle_ms / 1000 + 1.5)
        victim.popen.send_signal(signal.SIGCONT)
        self.report.pauses += 1

    def _chaos(self) -> None:
        turn = 0
        started = time.monotonic()
        while not self._stop.wait(self.config.chaos_interval_s):
            action = ACTIONS[turn % len(ACTIONS)]
            turn += 1
            self.report.timeline.append(f"+{time.monotonic() - started:.1f}s {action}")
            getattr(self, action)()
            self._check_crashes()

    def _check_crashes(self) -> None:
        for proc in [*self.gateways, *self.workers]:
            code = proc.popen.poll()
            if code is not None and not proc.is_deliberate_exit:
                proc.is_deliberate_exit = True  # report once
                self.report.crashes.append(f"{proc.name} exited {code}")

    # --- clients ------------------------------------------------------------------------
    def _url(self) -> str:
        return f"http://127.0.0.1:{self.rng.choice(self.gateways).port}"

    def _body(self, i: int) -> dict[str, Any]:
        return {"model": MODEL, "max_tokens": self.config.max_tokens, "ignore_eos": True,
                "temperature": 0, "messages": [{"role": "user", "content": f"request {i}"}]}

    def _client(self, index: int, deadline: float) -> None:
        i = 0
        with httpx.Client(timeout=httpx.Timeout(90, connect=3)) as http:
            while time.monotonic() < deadline:
                i += 1
                kind = "stream" if (index + i) % 2 else "job"
                outcome = Outcome(kind)
                try:
                    if kind == "stream":
                        self._stream(http, self._url(), self._body(i), outcome)
                    else:
                        resp = http.post(f"{self._url()}/v1/jobs", json=self._body(i))
                        outcome.status = resp.status_code
                        if resp.status_code == 202:
                            outcome.id = resp.json()["id"]
                except httpx.HTTPError as exc:
                    outcome.error = outcome.error or f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.status is None or outcome.status >= 500 or outcome.status == 429:
                    time.sleep(0.2)  # the fleet is recovering: don't spin

    @staticmethod
    def _stream(http: httpx.Client, url: str, body: dict[str, Any], outcome: Outcome) -> None:
        with http.stream("POST", f"{url}/v1/chat/completions",
                         json={**body, "stream": True}) as resp:
            outcome.status = resp.status_code
            if resp.status_code != 200:
                return
            event = "message"
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    continue
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if event == "restart":
                    outcome.text, event = "", "message"
                    continue
                if data == "[DONE]":
                    outcome.done = True
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = json.dumps(chunk["error"])
                    continue
                outcome.id = outcome.id or chunk.get("id")
                for choice in chunk.get("choices", []):
                    outcome.text += (choice.get("delta") or {}).get("content") or ""

    # --- the run ------------------------------------------------------------------------
    def run(self) -> Report:
        started = time.monotonic()
        deadline = started + self.config.duration_s
        clients = [threading.Thread(target=self._client, args=(i, deadline), daemon=True)
                   for i in range(self.config.num_clients)]
        chaos = threading.Thread(target=self._chaos, daemon=True)
        for thread in clients:
            thread.start()
        chaos.start()
        for thread in clients:
            thread.join()
        self._stop.set()
        chaos.join()
        self._check_crashes()
        self.report.duration_s = round(time.monotonic() - started, 1)
        self._verify()
        return self.report

    def _verify(self) -> None:
        report, keys = self.report, Keys(PREFIX)
        client = redis.Redis.from_url(self.redis.url)
        accepted = [o for o in self.outcomes if o.status in (200, 202) and o.id]
        for o in self.outcomes:
            if o.status not in (200, 202):
                label = str(o.status) if o.status is not None else "no answer"
                report.refused[label] = report.refused.get(label, 0) + 1
        report.requests_2xx = len(accepted)
        report.streams_2xx = sum(o.kind == "stream" for o in accepted)
        report.jobs_2xx = report.requests_2xx - report.streams_2xx
        ids = [o.id for o in accepted if o.id]
        self._settle(client, keys, ids)
        want = expected_text(self.config.max_tokens)
        for o in accepted:
            assert o.id is not None
            status = (client.hget(keys.job(o.id), "status") or b"").decode()
            text = (client.get(keys.job_text(o.id)) or b"").decode()
            if status in ("queued", "running"):
                report.stuck.append(o.id)
            elif status != "succeeded" or len(text) < len(want):
                report.lost.append(f"{o.id} status={status!r} chars={len(text)}")
            elif len(text) > len(want):
                report.duplicated.append(o.id)
            elif text != want:
                report.wrong_text.append(o.id)
            if o.kind == "stream":
                if o.error is not None or not o.done:
                    report.stream_errors.append(f"{o.id}: {o.error or 'no [DONE]'}")
                elif o.text != text:
                    report.stream_mismatch.append(o.id)
        time.sleep(self.config.events_ttl_s + 1.0)  # let the replay window pass
        for o in accepted:
            assert o.id is not None
            job_keys = [keys.job(o.id), keys.job_text(o.id), keys.job_events(o.id),
                        keys.cancel(o.id)]
            # EXISTS first: it expires a key whose TTL has passed (MEMORY USAGE alone
            # can still see one that Redis has not yet reclaimed)
            sizes = {k: client.memory_usage(k) or 0 for k in job_keys if client.exists(k)}
            overhead = sum(sizes.values()) - client.strlen(keys.job_text(o.id))
            if overhead > report.max_job_overhead_bytes:
                events_ttl = client.ttl(keys.job_events(o.id))
                report.max_job_overhead_bytes = overhead
                report.worst_job = f"{o.kind} {sizes} events ttl {events_ttl}"

        report.stream_entries_left = sum(client.xlen(keys.requests_stream(MODEL, lane))
                                         for lane in LANES)
        client.close()

    @staticmethod
    def _settle(client: redis.Redis, keys: Keys, ids: list[str]) -> None:
        """Wait until no accepted request is queued or running (or the timeout passes)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            pipe = client.pipeline(transaction=False)
            for job_id in pending:
                pipe.hget(keys.job(job_id), "status")
            statuses = pipe.execute()
            pending = [j for j, s in zip(pending, statuses, strict=True)
                       if s in (b"queued", b"running")]
            if pending:
                time.sleep(0.5)


def run_soak(config: SoakConfig, workdir: Path) -> Report:
    soak = Soak(config, workdir)
    try:
        soak.start()
        return soak.run()
    finally:
        soak.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between faults")
    parser.add_argument("--workdir", type=Path, default=Path("soak-run"))
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    config = SoakConfig(duration_s=args.duration, num_clients=args.clients,
                        chaos_interval_s=args.interval)
    report = run_soak(config, args.workdir)
    body = {**asdict(report), "is_clean": report.is_clean, "config": asdict(config)}
    text = json.dumps(body, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if report.is_clean else 1


if __name__ == "__main__":
    sys.exit(main())
