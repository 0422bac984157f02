"""The issue's targets, each computed from rows of the same run: measured value vs goal.

Ratios use the steady-state rate (every client still busy); the whole-run rate, the closed
loop's drain tail included, is reported beside each. A target whose inputs did not run is
reported with value ``None`` and ``met`` ``None`` (never guessed).
"""

from __future__ import annotations

from typing import Any

TARGET_CLIENTS = 32  # full path vs the baselines
EFFICIENCY_CLIENTS = 64
BATCH_REFERENCE_CLIENTS = 64  # the batch's throughput against the full path at 64 clients
BUS_GATEWAY_PROCESSES = 2  # the bus target: requests/s through this many gateway processes
BUS_TARGET_RPS = 2000.0
EFFICIENCY_GOALS = {"engine": 0.45, "full": 0.35}  # decode efficiency at 64 clients
PREFIX_TTFT_GOAL = 3.0  # shared-prefix workload: TTFT p50 cache off / on
PREFIX_TOKENS_GOAL = 1.5  # and tok/s cache on / off
LLAMACPP_BEST_GOAL = 1.5  # full at 32 clients / llama-server's best precision at 32 (mixed)
LLAMACPP_SAME_PRECISION_GOAL = 0.6  # full at 1 client / llama-server at the engine's dtype
LLAMACPP_COPY_GOAL = 1.0  # copy workload, 1 client: full (prompt lookup on) / llama-server q4_1
GGUF_PRECISION = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _find(runs: list[dict[str, Any]], system: str, clients: int | None, key: str,
          ) -> float | None:
    for row in runs:
        if row["system"] == system and (clients is None or row.get("concurrency") == clients):
            value = row.get(key)
            return float(value) if isinstance(value, (int, float)) else None
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 2)


def decode_efficiency(tokens_per_s: float | None, parameters: int, flops: float,
                      ) -> float | None:
    """Output tokens/s x 2 x parameters / measured matmul FLOP/s (2 FLOPs per weight per
    token: the decode's matmul work only; attention and prefill are not counted)."""
    if not tokens_per_s or not parameters or not flops:
        return None
    return round(tokens_per_s * 2 * parameters / flops, 3)


def _prefix_cache_rows(runs: list[dict[str, Any]],
                       ) -> list[tuple[str, float | None, float | None, str, float]]:
    """Shared-prefix workload (``--prefix-cache on,off``): the cache's effect at 32 clients,
    or at the most clients both rows ran when 32 did not run."""
    rows = []
    for system in ("engine", "full"):
        on, off = f"{system}[cache-on]", f"{system}[cache-off]"
        both = sorted({r.get("concurrency") for r in runs if r["system"] == on}
                      & {r.get("concurrency") for r in runs if r["system"] == off}
                      - {None})
        c = TARGET_CLIENTS if TARGET_CLIENTS in both or not both else both[-1]
        ttft = _ratio(_find(runs, off, c, "ttft_p50_ms"), _find(runs, on, c, "ttft_p50_ms"))
        rows.append((f"shared prefix, {system} at {c} clients: TTFT p50 cache off / on", ttft,
                     ttft, f">= {PREFIX_TTFT_GOAL:g}x", PREFIX_TTFT_GOAL))
        steady, whole = (_ratio(_find(runs, on, c, key), _find(runs, off, c, key))
                         for key in ("steady_tokens_per_s", "output_tokens_per_s"))
        rows.append((f"shared prefix, {system} at {c} clients: tok/s cache on / off", steady,
                     whole, f">= {PREFIX_TOKENS_GOAL:g}x", PREFIX_TOKENS_GOAL))
    return rows


def _llamacpp_rows(runs: list[dict[str, Any]], meta: dict[str, Any],
                   ) -> list[tuple[str, float | None, float | None, str, float]]:
    """Issue 15: the full path against llama.cpp's server, same run and machine. On the copy
    workload (prompt lookup is for it): 1 client against the shipped Q4_1; on the others: 32
    clients against llama-server's best precision, and 1 client at the engine's precision."""
    def both(system: str, base: str, clients: int) -> tuple[float | None, float | None]:
        return (_ratio(_find(runs, system, clients, "steady_tokens_per_s"),
                       _find(runs, base, clients, "steady_tokens_per_s")),
                _ratio(_find(runs, system, clients, "output_tokens_per_s"),
                       _find(runs, base, clients, "output_tokens_per_s")))

    if meta.get("workload") == "copy":
        steady, whole = both("full", "llamacpp[q4_1]", 1)
        return [("copy workload, 1 client: full / llama-server q4_1", steady, whole,
                 f">= {LLAMACPP_COPY_GOAL:g}x", LLAMACPP_COPY_GOAL)]
    c = TARGET_CLIENTS
    best, best_rate = None, 0.0
    for row in runs:
        rate = row.get("steady_tokens_per_s")
        if (str(row["system"]).startswith("llamacpp[") and row.get("concurrency") == c
                and isinstance(rate, (int, float)) and rate > best_rate):
            best, best_rate = row["system"], float(rate)
    steady, whole = both("full", best, c) if best else (None, None)
    name = f"full / llama-server's best ({best or 'n/a'}), {c} clients"
    rows = [(name, steady, whole, f">= {LLAMACPP_BEST_GOAL:g}x", LLAMACPP_BEST_GOAL)]
    precision = GGUF_PRECISION.get(str(meta.get("dtype")), "")
    steady, whole = both("full", f"llamacpp[{precision}]", 1) if precision else (None, None)
    rows.append((f"full / llama-server at the same precision ({precision or 'n/a'}), 1 client",
                 steady, whole, f">= {LLAMACPP_SAME_PRECISION_GOAL:g}x",
                 LLAMACPP_SAME_PRECISION_GOAL))
    return rows


def compute_targets(runs: list[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    c = TARGET_CLIENTS
    rows: list[tuple[str, float | None, float | None, str, float]] = []
    for name, base, base_clients, goal, threshold in (
            (f"full / static batching, {c} clients", "static", c, ">= 4x", 4.0),
            (f"full at {c} clients / naive (serial)", "naive", None, ">= 20x", 20.0),
            (f"full / transformers CB, {c} clients", "hf-cb", c, ">= 3x", 3.0),
            (f"full / in-process engine, {c} clients", "engine", c, ">= 0.9", 0.9)):
        steady = _ratio(_find(runs, "full", c, "steady_tokens_per_s"),
                        _find(runs, base, base_clients, "steady_tokens_per_s"))
        whole = _ratio(_find(runs, "full", c, "output_tokens_per_s"),
                       _find(runs, base, base_clients, "output_tokens_per_s"))
        rows.append((name, steady, whole, goal, threshold))
    flops = float(meta.get("matmul_gflops") or 0.0) * 1e9
    params = int(meta.get("parameters") or 0)
    for system in ("engine", "full"):
        steady, whole = (decode_efficiency(_find(runs, system, EFFICIENCY_CLIENTS, key), params,
                                           flops)
                         for key in ("steady_tokens_per_s", "output_tokens_per_s"))
        goal = EFFICIENCY_GOALS[system]
        rows.append((f"decode efficiency, {system} at {EFFICIENCY_CLIENTS} clients", steady,
                     whole, f">= {goal}", goal))
    rows.extend(_prefix_cache_rows(runs))
    rows.extend(_llamacpp_rows(runs, meta))
    bus = _find(runs, f"bus-{BUS_GATEWAY_PROCESSES}gw", None, "requests_per_s")
    rows.append((f"bus requests/s, {BUS_GATEWAY_PROCESSES} gateway processes", bus, bus,
                 f">= {BUS_TARGET_RPS:,.0f}", BUS_TARGET_RPS))
    batch = _find(runs, "batch", None, "output_tokens_per_s")
    reference = _find(runs, "full", BATCH_REFERENCE_CLIENTS, "steady_tokens_per_s")
    ratio = _ratio(batch, reference)
    rows.append((f"batch tok/s / full steady at {BATCH_REFERENCE_CLIENTS} clients", ratio, ratio,
                 ">= 0.9", 0.9))
    idle = _find(runs, "interactive", None, "ttft_p99_ms")
    during = _find(runs, "interactive+batch", None, "ttft_p99_ms")
    slowdown = _ratio(during, idle)
    rows.append(("interactive TTFT p99 during a batch / idle", slowdown, slowdown, "<= 2x", 2.0))
    for feature, goal, threshold in (("json_schema", ">= 0.85", 0.85),
                                     ("penalties", ">= 0.95", 0.95)):
        steady, whole = (_ratio(_find(runs, f"features:{feature}", None, key),
                                _find(runs, "features:none", None, key))
                         for key in ("steady_tokens_per_s", "output_tokens_per_s"))
        rows.append((f"tok/s with {feature} on every request / none", steady, whole, goal,
                     threshold))
    return [{"name": n, "value": v, "whole_run": w, "goal": g,
             "met": None if v is None else (v <= t if g.startswith("<=") else v >= t)}
            for n, v, w, g, t in rows]
