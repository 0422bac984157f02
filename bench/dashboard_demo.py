"""Load to look at the dashboard: a private fleet (gateway, autoscaled real workers), a few
concurrent chat clients for a while, then a headless-Chromium screenshot of /dashboard.

    python -m bench.dashboard_demo --seconds 120 --clients 6 --standby 1 \
        --out docs/img/dashboard.png

Needs selenium and chromium + chromium-driver (what the dashboard test uses).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import redis

from bench.fleet import LocalFleet
from shared.keys import Keys
from shared.settings import DEFAULT_MODEL
from tokenfleet.autoscale import Autoscaler, ScalePolicy, run
from tokenfleet.supervisor import role_argv, spawn

QUESTIONS = ("What is the capital of France?", "Name three primary colors.",
             "Write a haiku about queues.", "Why is the sky blue?",
             "Give me a tip for writing tests.", "What does a load balancer do?")


async def clients(url: str, num: int, seconds: float) -> int:
    done = 0
    deadline = time.monotonic() + seconds

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            body = {"model": DEFAULT_MODEL, "max_tokens": random.choice((16, 32, 64)),
                    "stream": True, "messages": [
                        {"role": "user", "content": random.choice(QUESTIONS)}]}
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                async for _ in resp.aiter_lines():
                    pass
            done += 1
            await asyncio.sleep(random.uniform(0.0, 1.5))

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(one(client) for _ in range(num)))
    return done


def screenshot(url: str, out: Path) -> None:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1440,1400"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(f"{url}/dashboard")
        time.sleep(3)  # two polls: charts and tables drawn
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_demo", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("docs/img/dashboard.png"))
    parser.add_argument("--standby", type=int, default=0, help="loaded spare workers")
    args = parser.parse_args(argv)
    env = {"TOKENFLEET_SCALE_TO_ZERO": "true", "TOKENFLEET_SCALE_DOWN_IDLE_S": "20"}
    with LocalFleet(env, workers=0) as fleet:
        client = redis.Redis.from_url(fleet.redis_url)
        scaler = Autoscaler(client, Keys(fleet.prefix), DEFAULT_MODEL,
                            ScalePolicy(min_workers=1, max_workers=2, target_requests=4,
                                        idle_s=20, standby=args.standby),
                            lambda name, standby: spawn(role_argv("worker"), {
                                **fleet.supervisor.env,
                                "TOKENFLEET_WORKER_STANDBY": str(standby).lower()}))
        stop = threading.Event()
        thread = threading.Thread(target=run, args=(scaler, stop.is_set), daemon=True)
        thread.start()
        try:
            fleet.supervisor.wait_ready(fleet.url, 1, 300)
            result: list[int] = []
            load = threading.Thread(target=lambda: result.append(
                asyncio.run(clients(fleet.url, args.clients, args.seconds))))
            load.start()
            time.sleep(args.seconds * 0.9)  # while the clients still send
            screenshot(fleet.url, args.out)
            load.join()
            served = result[0] if result else 0
        finally:
            stop.set()
            thread.join(timeout=5)
            scaler.stop(timeout_s=30)
            client.close()
    print(f"{served} requests served; screenshot in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
