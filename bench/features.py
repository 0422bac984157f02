"""The ``features`` system of ``tokenfleet bench`` (issue 16's cost targets).

One fleet, then the same closed-loop load (``--features-concurrency`` clients, the
``--workload``) once per feature set of ``--features``: ``none`` (the reference),
``json_schema`` (every request constrained by a schema), ``penalties`` (presence,
frequency and repetition penalties and a ``logit_bias`` on every request), ``logprobs``
(top 5). Each is a row ``features:<name>``; the targets compare each one's steady tok/s
with ``features:none`` of the same run.

The schema is an object holding an unbounded array of strings, so the grammar stays active
through ``max_tokens`` (the load uses ``ignore_eos``; a grammar that completed early would
stop costing anything and flatter the ratio).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.cli import Bench

log = logging.getLogger("bench")

BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string"},
                   "lines": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "lines"], "additionalProperties": False}

FEATURE_SETS: dict[str, dict[str, Any]] = {
    "none": {},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "bench", "schema": BENCH_SCHEMA, "strict": True}}},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5,
                  "repetition_penalty": 1.1, "logit_bias": {"13": -5, "42": 2}},
    "logprobs": {"logprobs": True, "top_logprobs": 5},
}
DEFAULT_FEATURES = "none,json_schema,penalties"


def feature_names(text: str) -> list[str]:
    """The feature sets of ``--features``, ``none`` first (the reference)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(FEATURE_SETS))
    if unknown:
        raise SystemExit(f"unknown features: {', '.join(unknown)} (known: "
                         f"{', '.join(FEATURE_SETS)})")
    return ["none", *[n for n in dict.fromkeys(names) if n != "none"]]


def feature_system(name: str) -> str:
    return f"features:{name}"


def run_features(bench: Bench) -> None:
    from bench.fleet import LocalFleet, cores_used
    from bench.http_load import run_async, run_http

    clients = 4 if bench.args.quick else bench.args.features_concurrency
    names = feature_names(bench.args.features)
    point = (clients, None)
    for name in names:
        bench.describe(feature_system(name), f"closed loop, {clients} clients, every request "
                       f"with {FEATURE_SETS[name] or 'no extra parameters'}")
    try:
        fleet = LocalFleet({}).__enter__()
    except Exception as exc:
        for name in names:
            bench.failed(feature_system(name), point, exc)
        return
    try:
        for name in names:
            try:
                before = fleet.cpu_seconds()
                result = run_async(run_http(
                    fleet.url, bench.settings.model_name, bench.load(*point),
                    redis_url=fleet.redis_url, prefix=fleet.prefix,
                    http_client=bench.args.http_client, extra_body=FEATURE_SETS[name]))
                result.cpu_cores = cores_used(before, fleet.cpu_seconds(), result.wall_s)
                bench.record(feature_system(name), point, result)
            except Exception as exc:
                bench.failed(feature_system(name), point, exc)
    finally:
        fleet.__exit__(None, None, None)
