"""What one request and one token cost Redis: commands (``INFO commandstats`` deltas) and
Redis CPU time, over a real gateway + null-engine workers, for docs/deploy.md's sizing.

    python -m bench.redis_cost --requests 1000 --concurrency 32 --tokens 16,64

Each token count runs on a fresh fleet; cost = a + b * tokens is fitted over them, so ``a``
is per request and ``b`` per generated token at that concurrency (a busy worker writes one
transaction per step for its whole batch, so ``b`` falls as batches grow). Background
commands (heartbeats, telemetry, backlog checks) are included: they are part of the bill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import redis

from bench.fleet import LocalFleet


@dataclass(slots=True)
class Run:
    tokens: int
    requests: int
    concurrency: int
    workers: int
    wall_s: float
    calls: int  # Redis commands executed (scripts' inner commands included)
    redis_cpu_s: float
    calls_by_command: dict[str, int]

    @property
    def calls_per_request(self) -> float:
        return self.calls / self.requests

    @property
    def cpu_us_per_request(self) -> float:
        return self.redis_cpu_s * 1e6 / self.requests


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def redis_cpu_s(client: redis.Redis) -> float:
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def send(url: str, num_requests: int, concurrency: int, tokens: int) -> None:
    semaphore = asyncio.Semaphore(concurrency)
    body = {"prompt": "How many workers does one Redis carry?", "max_tokens": tokens,
            "stream": True}

    async def one(client: httpx.AsyncClient) -> None:
        async with semaphore, client.stream("POST", f"{url}/v1/completions",
                                            json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return
        raise RuntimeError("a stream ended without [DONE]")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(num_requests)))


def measure(tokens: int, args: argparse.Namespace) -> Run:
    env = {"TOKENFLEET_ENGINE": "null", "TOKENFLEET_NULL_ENGINE_TOKENS": str(tokens),
           "TOKENFLEET_MAX_BATCH_SIZE": str(max(args.concurrency, 1))}
    with LocalFleet(env, workers=args.workers) as fleet:
        client = redis.Redis.from_url(fleet.redis_url)
        asyncio.run(send(fleet.url, args.concurrency, args.concurrency, tokens))  # warm-up
        before, cpu_before, started = command_calls(client), redis_cpu_s(client), time.time()
        asyncio.run(send(fleet.url, args.requests, args.concurrency, tokens))
        wall_s = time.time() - started
        after, cpu_after = command_calls(client), redis_cpu_s(client)
        client.close()
    by_command = {name: after[name] - before.get(name, 0) for name in after
                  if after[name] - before.get(name, 0) > 0}
    by_command.pop("info", None)  # our own measurement
    return Run(tokens=tokens, requests=args.requests, concurrency=args.concurrency,
               workers=args.workers, wall_s=round(wall_s, 2), calls=sum(by_command.values()),
               redis_cpu_s=round(cpu_after - cpu_before, 3),
               calls_by_command=dict(sorted(by_command.items(), key=lambda kv: -kv[1])))


def fit(runs: list[Run]) -> dict[str, float]:
    """Least squares of per-request cost against tokens: intercept = per request,
    slope = per token."""
    xs = [run.tokens for run in runs]
    out: dict[str, float] = {}
    for name, ys in (("calls", [r.calls_per_request for r in runs]),
                     ("cpu_us", [r.cpu_us_per_request for r in runs])):
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
        out[f"{name}_per_token"] = round(slope, 3)
        out[f"{name}_per_request"] = round(mean_y - slope * mean_x, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cost", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tokens", default="16,64", help="comma-separated, at least two")
    args = parser.parse_args(argv)
    token_counts = [int(t) for t in args.tokens.split(",")]
    if len(set(token_counts)) < 2:
        parser.error("--tokens needs at least two different counts to separate the costs")
    runs = [measure(tokens, args) for tokens in token_counts]
    result = {"command": " ".join(["python -m bench.redis_cost", *(argv or sys.argv[1:])]),
              "machine": platform.platform(), "runs": [
                  {**asdict(run), "calls_per_request": round(run.calls_per_request, 2),
                   "cpu_us_per_request": round(run.cpu_us_per_request, 1)} for run in runs],
              "fit": fit(runs)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
