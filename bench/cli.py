"""``tokenfleet bench``: every system, one run, one report.

Systems: ``naive`` (one ``generate`` at a time), ``static`` (window + max batch, one
``generate`` per batch), ``hf-cb`` (transformers' continuous batching), ``engine`` (the
tokenfleet engine in-process), ``full`` (gateway + Redis + worker processes over HTTP) and
``bus`` (the full path with a null engine: what gateway, Redis and pub/sub can carry).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.metrics import RequestRecord, summarize
from bench.workload import WORKLOADS, BenchRequest, make_requests, split_among_clients
from shared.settings import Settings

SYSTEMS = ("naive", "static", "hf-cb", "engine", "full", "bus")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
log = logging.getLogger("bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated subset of: " + ", ".join(SYSTEMS))
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed")
    parser.add_argument("--concurrency", default="1,4,16,32,64",
                        help="client counts for engine and full (default 1,4,16,32,64)")
    parser.add_argument("--baseline-concurrency", default="32",
                        help="client counts for static and hf-cb (naive runs at 1: it is serial)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--rate", type=float, default=4.0, help="open loop: requests per second")
    parser.add_argument("--bus-requests", type=int, default=3000)
    parser.add_argument("--bus-concurrency", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (CI): concurrency 1 and 4, max_tokens capped at 8")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--no-append", action="store_true",
                        help="do not append the Markdown table to docs/benchmarks.md")


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class Bench:
    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown:
            raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
        self.cap = 8 if args.quick else None
        self.concurrency = [1, 4] if args.quick else _csv_ints(args.concurrency)
        self.baseline_concurrency = [4] if args.quick else _csv_ints(args.baseline_concurrency)
        self.runs: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}

    def requests(self, clients: int, minimum: int = 8) -> list[list[BenchRequest]]:
        per = 1 if self.args.quick else self.args.requests_per_client
        count = max(clients * per, 2 if self.args.quick else minimum)
        reqs = make_requests(self.args.workload, count, self.cap)
        return split_among_clients(reqs, clients)

    def record(self, system: str, clients: int, result: tuple[list[RequestRecord], float,
                                                               float | None],
               note: str = "") -> dict[str, Any]:
        records, wall, batch = result
        row = {"system": system, "concurrency": clients, **summarize(records, wall, batch)}
        if note:
            row["note"] = note
        self.runs.append(row)
        log.warning("%-7s c=%-3d %8.1f tok/s  %6.2f req/s  ttft p99 %s ms  errors %d", system,
                    clients, row["output_tokens_per_s"] or 0, row["requests_per_s"] or 0,
                    row["ttft_p99_ms"], row["errors"])
        return row

    def failed(self, system: str, clients: int, exc: BaseException) -> None:
        self.runs.append({"system": system, "concurrency": clients,
                          "note": f"did not run: {type(exc).__name__}: {exc}"})
        log.warning("%s c=%d did not run: %s", system, clients, exc)

    # --- phases ---------------------------------------------------------------------------
    def run_inprocess(self) -> None:
        wanted = [s for s in ("naive", "static", "hf-cb", "engine") if s in self.systems]
        if not wanted and "full" not in self.systems:
            return
        from bench import inprocess
        from worker.model_store import resolve_model_path

        bundle = inprocess.load_bundle(self.settings, Path(resolve_model_path(self.settings)))
        self.meta.update(dtype=str(bundle.loaded.dtype).removeprefix("torch."),
                         parameters=bundle.num_parameters,
                         matmul_gflops=inprocess.matmul_flops() / 1e9)
        plan: list[tuple[str, int, Callable[..., Any], str]] = []
        if "naive" in wanted:
            plan.append(("naive", 1, inprocess.run_naive,
                         "serial by design: throughput is the same at any concurrency"))
        for clients in self.baseline_concurrency:
            if "static" in wanted:
                plan.append(("static", clients, inprocess.run_static, ""))
            if "hf-cb" in wanted:
                plan.append(("hf-cb", clients, inprocess.run_hf_continuous, ""))
        if "engine" in wanted:
            plan += [("engine", c, inprocess.run_engine, "") for c in self.concurrency]
        for system, clients, fn, note in plan:
            try:
                if system == "engine" and self.args.mode == "open":
                    per = self.requests(clients)
                    offsets = _poisson(sum(len(q) for q in per), self.args.rate)
                    self.record(system, clients, fn(bundle, per, offsets), note)
                else:
                    self.record(system, clients, fn(bundle, self.requests(clients)), note)
            except Exception as exc:  # report, don't hide: a baseline that cannot run here
                self.failed(system, clients, exc)
        del bundle

    def run_full(self) -> None:
        from bench.fleet import LocalFleet
        from bench.http_load import run_http

        rate = self.args.rate if self.args.mode == "open" else None
        with LocalFleet({}) as fleet:
            warm = split_among_clients(make_requests(self.args.workload, 2, 8), 2)
            asyncio.run(run_http(fleet.url, self.settings.model_name, warm))
            for clients in self.concurrency:
                result = asyncio.run(run_http(fleet.url, self.settings.model_name,
                                              self.requests(clients), redis_url=fleet.redis_url,
                                              prefix=fleet.prefix, rate=rate))
                self.record("full", clients, result)

    def run_bus(self) -> None:
        from bench.fleet import LocalFleet
        from bench.http_load import run_http

        clients = 4 if self.args.quick else self.args.bus_concurrency
        count = 40 if self.args.quick else self.args.bus_requests
        env = {"TOKENFLEET_ENGINE": "null", "TOKENFLEET_NULL_ENGINE_TOKENS": "16",
               "TOKENFLEET_MAX_BATCH_SIZE": "256", "TOKENFLEET_COALESCE_MS": "2"}
        with LocalFleet(env) as fleet:
            reqs = make_requests("uniform", count, 16)
            asyncio.run(run_http(fleet.url, self.settings.model_name, [reqs[:8]]))
            result = asyncio.run(run_http(fleet.url, self.settings.model_name,
                                          split_among_clients(reqs, clients)))
            self.record("bus", clients, result, "null engine: 16 dummy tokens per request")

    # --- targets ----------------------------------------------------------------------------
    def targets(self) -> list[dict[str, Any]]:
        """Ratios on the steady-state rate (all clients busy); the whole-run rate, drain tail
        included, is shown beside each."""
        def tps(system: str, clients: int, key: str) -> float | None:
            for row in self.runs:
                if row["system"] == system and row["concurrency"] == clients:
                    return row.get(key)
            return None

        def ratio(a: float | None, b: float | None) -> float | None:
            return None if not a or not b else round(a / b, 2)

        flops = self.meta.get("matmul_gflops", 0) * 1e9
        params = self.meta.get("parameters", 0)
        out = []
        for name, base, base_clients, goal, threshold in (
                ("full / static batching, 32 clients", "static", 32, ">= 4x", 4),
                ("full at 32 clients / naive (serial)", "naive", 1, ">= 20x", 20),
                ("full / transformers CB, 32 clients", "hf-cb", 32, ">= 3x", 3),
                ("full / in-process engine, 32 clients", "engine", 32, ">= 0.9", 0.9)):
            steady = ratio(tps("full", 32, "steady_tokens_per_s"),
                           tps(base, base_clients, "steady_tokens_per_s"))
            whole = ratio(tps("full", 32, "output_tokens_per_s"),
                          tps(base, base_clients, "output_tokens_per_s"))
            out.append((name, steady, whole, goal, threshold))
        for system in ("engine", "full"):
            eff = [round(r * 2 * params / flops, 3) if r and flops and params else None
                   for r in (tps(system, 64, "steady_tokens_per_s"),
                             tps(system, 64, "output_tokens_per_s"))]
            out.append((f"decode efficiency, {system} at 64 clients", eff[0], eff[1],
                        ">= 0.35", 0.35))
        bus = next((r.get("requests_per_s") for r in self.runs if r["system"] == "bus"), None)
        out.append(("bus requests/s (one gateway)", bus, bus, ">= 2000", 2000))
        return [{"name": n, "value": v, "whole_run": w, "goal": g,
                 "met": None if v is None else v >= t} for n, v, w, g, t in out]

    def run(self) -> dict[str, Any]:
        self.meta.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), workload=self.args.workload,
                         mode=self.args.mode, model=self.settings.model_name,
                         command="tokenfleet bench " + " ".join(_bench_args(sys.argv)))
        self.run_inprocess()
        if "full" in self.systems:
            self.run_full()
        if "bus" in self.systems:
            self.run_bus()
        from bench.report import machine

        self.meta.setdefault("dtype", self.settings.dtype)
        self.meta.setdefault("parameters", 0)
        self.meta.setdefault("matmul_gflops", 0.0)
        self.meta["machine"] = machine()
        return {"meta": self.meta, "runs": self.runs,
                "targets": [] if self.args.quick else self.targets()}


def _bench_args(argv: list[str]) -> list[str]:
    """The arguments after ``bench`` (``tokenfleet bench ...``) or the script (``-m bench``)."""
    return argv[argv.index("bench") + 1:] if "bench" in argv else argv[1:]


def _poisson(count: int, rate: float, seed: int = 0) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def run(args: argparse.Namespace, settings: Settings) -> int:
    from bench.report import markdown, write

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    result = Bench(args, settings).run()
    path = write(result, args.out, None if args.no_append else DOCS)
    print(markdown(result))
    print(f"results: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenfleet bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv), Settings())
