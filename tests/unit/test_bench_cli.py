"""``bench.cli``: flags, load points per system, and no heavy imports."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bench import cli
from bench.loadgen import ClosedLoop, OpenLoop
from shared.settings import Settings


def _bench(*argv: str) -> cli.Bench:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.Bench(parser.parse_args(list(argv)), Settings())


def test_add_parser_registers_bench_on_a_subparsers_object() -> None:
    parser = argparse.ArgumentParser(prog="tokenfleet")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["bench", "--systems", "engine", "--quick", "--no-append"])
    assert args.command == "bench" and args.systems == "engine" and args.quick
    assert callable(args.func)


def test_requests_and_duration_are_exclusive() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--requests", "10", "--duration", "5"])


def test_unknown_systems_are_refused() -> None:
    with pytest.raises(SystemExit):
        _bench("--systems", "engine,vllm")


def test_points_per_system() -> None:
    bench = _bench("--concurrency", "1,8", "--baseline-concurrency", "16")
    assert bench.points("naive") == [(1, None)]
    assert bench.points("static") == [(16, None)] == bench.points("hf-cb")
    assert bench.points("engine") == [(1, None), (8, None)] == bench.points("full")
    quick = _bench("--quick")
    assert quick.points("engine") == [(1, None), (4, None)]
    assert quick.points("static") == [(4, None)]
    opened = _bench("--mode", "open", "--rate", "2,8")
    assert opened.points("naive") == [(None, 2.0), (None, 8.0)] == opened.points("full")


def _drain(load: ClosedLoop) -> int:
    """Requests a closed loop hands out when every request ends at once."""
    subs = load.start(0.0)
    count = 0
    while subs:
        sub = subs.pop()
        count += 1
        subs += load.finished(sub.client, 0.0)
    return count


def test_request_counts() -> None:
    default = _bench("--requests-per-client", "3").load(4, None)
    assert isinstance(default, ClosedLoop) and _drain(default) == 12
    assert _drain(_bench().load(1, None)) == cli.MIN_REQUESTS  # at least one whole cycle
    assert _drain(_bench("--requests", "5").load(2, None)) == 5
    assert _drain(_bench("--requests", "2").load(4, None)) == 4  # one per client at least
    quick = _bench("--quick").load(4, None)
    assert isinstance(quick, ClosedLoop)
    assert max(r.max_tokens for q in quick.per_client for r in q) <= cli.QUICK_MAX_TOKENS
    timed = _bench("--duration", "3").load(2, None)
    assert isinstance(timed, ClosedLoop) and timed.duration_s == 3.0
    opened = _bench("--mode", "open", "--rate", "5", "--requests", "7").load(None, 5.0)
    assert isinstance(opened, OpenLoop)
    assert len(opened.start(0.0)) + len(opened.due(1e9)) == 7


def test_importing_bench_cli_loads_no_torch_transformers_or_fastapi() -> None:
    code = ("import sys, bench.cli; "
            "print([m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
