"""Cold start, stage by stage: from "a request arrives at an empty fleet" to "first token".

    python -m bench.cold_start --runs 5            # the built-in model (prepared)
    python -m bench.cold_start --runs 5 --engine null
    python -m bench.cold_start --runs 5 --standby 1   # a loaded spare is promoted

A gateway with ``TOKENFLEET_SCALE_TO_ZERO`` and the autoscaler (``tokenfleet.autoscale``,
min 0, max 1) run against a private Redis. Each run waits for zero workers, sends one
streaming request, and splits the time to its first token into:

- ``reaction``: request sent -> the autoscaler started a worker process;
- ``process start``: -> the process exists (``/proc`` start time);
- the worker's own clock (``worker.startup``, read from its ``/metrics``): ``imports``,
  ``torch_import``, ``weights``, ``warmup``, ``serving`` (groups + model info in Redis);
- ``first step``: serving -> the first token at the client (read, prefill, one decode step,
  publish, SSE).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import REPO, LocalFleet, free_port
from bench.machine import ForeignLoad, machine
from shared.keys import Keys
from shared.settings import DEFAULT_MODEL
from tokenfleet.autoscale import TICK_S, Autoscaler, ScalePolicy, pid_of, run
from tokenfleet.supervisor import role_argv

WORKER_STAGES = ("imports", "torch_import", "weights", "warmup", "standby", "serving")
IDLE_S = 1.0


def scrape_startup(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tokenfleet:worker_startup_seconds":
                found[sample.labels["stage"]] = sample.value
            elif sample.name == "tokenfleet:worker_start_time_seconds":
                found["process_start_time"] = sample.value
    return found


def first_token(url: str, model: str) -> float:
    """Send one streaming request; the unix time its first generated text arrived."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.time()
    raise RuntimeError("the stream ended without text")


def spares_loaded(client: redis.Redis, keys: Keys, scaler: Autoscaler) -> bool:
    """Every spare the policy asks for heartbeats ``standby`` (its model is loaded)."""
    spares = [w for w in scaler.workers if w.is_standby]
    if len(spares) < scaler.policy.standby:
        return False
    states = {pid_of(raw.decode()): client.hget(keys.worker(raw.decode()), "state")
              for raw in client.zrange(keys.workers, 0, -1)}
    return all(states.get(w.proc.pid) == b"standby" for w in spares)


def one_run(fleet: LocalFleet, scaler: Autoscaler, ports: dict[str, int],
            ready: Callable[[], bool]) -> dict[str, float]:
    """From an empty fleet (spares loaded, if any) to the first token of one request."""
    while any(not w.is_standby for w in scaler.workers) or not ready():
        time.sleep(0.05)
    sent = time.time()
    got = first_token(fleet.url, DEFAULT_MODEL)
    worker = next(w for w in scaler.workers if not w.is_standby)
    stages = scrape_startup(ports[worker.name])
    process_at = stages.pop("process_start_time")
    serving_at = process_at + sum(stages.get(name, 0.0) for name in WORKER_STAGES)
    if worker.promoted_at is not None:  # a spare: loaded before the request came
        row = {"reaction": worker.promoted_at - sent, "process start": 0.0}
        row.update(dict.fromkeys(WORKER_STAGES, 0.0))
        row["serving"] = stages.get("serving", 0.0)
    else:
        row = {"reaction": worker.started_at - sent,
               "process start": max(0.0, process_at - worker.started_at)}
        row.update({name: stages.get(name, 0.0) for name in WORKER_STAGES})
    row.pop("standby", None)
    row["first step"] = got - serving_at
    row["total"] = got - sent
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--engine", choices=("hf", "null"), default="hf")
    parser.add_argument("--standby", type=int, default=0,
                        help="loaded spares (TOKENFLEET_SCALE_STANDBY_WORKERS)")
    args = parser.parse_args(argv)
    env = {"TOKENFLEET_SCALE_TO_ZERO": "true", "TOKENFLEET_ENGINE": args.engine}
    load = ForeignLoad()
    with LocalFleet(env, workers=0) as fleet:
        ports: dict[str, int] = {}

        def start(name: str, standby: bool) -> subprocess.Popen[bytes]:
            ports[name] = free_port()
            log = open(fleet.dir / f"{name}.log", "wb")  # noqa: SIM115 - lives with it
            return subprocess.Popen(
                role_argv("worker"), cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT,
                env={**fleet.supervisor.env, "TOKENFLEET_METRICS_PORT": str(ports[name]),
                     "TOKENFLEET_LOG_LEVEL": "INFO",
                     "TOKENFLEET_WORKER_STANDBY": str(standby).lower()})

        client = redis.Redis.from_url(fleet.redis_url)
        keys = Keys(fleet.prefix)
        scaler = Autoscaler(client, keys, DEFAULT_MODEL,
                            ScalePolicy(min_workers=0, max_workers=1, target_requests=16,
                                        idle_s=IDLE_S, standby=args.standby), start)
        stop = threading.Event()
        thread = threading.Thread(target=run, args=(scaler, stop.is_set), daemon=True)
        thread.start()
        try:
            while not client.sismember(keys.models, DEFAULT_MODEL):  # bootstrap worker
                time.sleep(0.1)
            load.start()
            ready = functools.partial(spares_loaded, client, keys, scaler)
            rows = [one_run(fleet, scaler, ports, ready) for _ in range(args.runs)]
            foreign = load.stop()
        finally:
            stop.set()
            thread.join(timeout=5)
            scaler.stop(timeout_s=30)
            client.close()
    names = list(rows[0])
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.cold_start", *(argv or sys.argv[1:])]),
        "engine": args.engine, "standby": args.standby, "machine": machine(), "load": foreign,
        "tick_s": TICK_S, "runs": [{k: round(v, 3) for k, v in row.items()} for row in rows],
        "p50": {name: round(statistics.median(row[name] for row in rows), 3)
                for name in names},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
