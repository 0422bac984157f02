"""``bench.cli``: flags, load points per system, and no heavy imports."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

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


def test_bus_runs_one_row_per_gateway_process_count(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, dict[str, str]]] = []

    def fake_run_fleet(system: str, env: dict[str, str], points: object, loads: object,
                       http_client: str, gateway_processes: int = 1) -> None:
        calls.append((system, gateway_processes, env))

    bench = _bench("--systems", "bus", "--bus-gateways", "1,2")
    monkeypatch.setattr(bench, "run_fleet", fake_run_fleet)
    bench.run_bus()
    assert [(system, n) for system, n, _ in calls] == [("bus", 1), ("bus-2gw", 2)]
    assert all(env["TOKENFLEET_ENGINE"] == "null" for _, _, env in calls)
    assert "2 gateway processes" in bench.meta["system_notes"]["bus-2gw"]
    calls.clear()
    quick = _bench("--systems", "bus", "--quick")
    monkeypatch.setattr(quick, "run_fleet", fake_run_fleet)
    quick.run_bus()
    assert [(system, n) for system, n, _ in calls] == [("bus", 1)]  # CI: one fleet only


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_of_a_process_tree_counts_its_children() -> None:
    from bench.fleet import child_pids, process_cpu_seconds, tree_cpu_seconds

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n" \
           "time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               f"kids = [subprocess.Popen([sys.executable, '-c', {burn!r}]) "
                               "for _ in range(2)]\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            kids = child_pids(parent.pid)
            if len(kids) == 2 and all((process_cpu_seconds(k) or 0) >= 0.3 for k in kids):
                break
            time.sleep(0.05)
        total, per_child = tree_cpu_seconds(parent.pid)
        assert len(per_child) == 2 and all(s >= 0.3 for s in per_child)
        assert total is not None and total >= sum(per_child) + (process_cpu_seconds(parent.pid)
                                                                or 0) - 0.02
    finally:
        for kid in child_pids(parent.pid):
            os.kill(kid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_scheduling_names_one_row_per_policy_and_refuses_unknown_ones() -> None:
    assert _bench().policy_rows("engine") == [("engine", None)]
    both = _bench("--scheduling", "mixed, phase")
    assert both.policy_rows("engine") == [("engine[mixed]", "mixed"), ("engine[phase]", "phase")]
    assert both.policy_rows("full") == [("full[mixed]", "mixed"), ("full[phase]", "phase")]
    for wrong in ("mixed,fifo", "phase,phase"):
        with pytest.raises(SystemExit, match="--scheduling"):
            _bench("--scheduling", wrong)


def test_engine_policies_alternate_at_each_point_on_the_same_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import inprocess
    from bench.metrics import RequestRecord, RunResult

    calls: list[tuple[str | None, int, list[int]]] = []

    def fake_run(bundle: object, load: ClosedLoop, policy: str | None = None) -> RunResult:
        calls.append((policy, load.num_clients,
                      [r.max_tokens for q in load.per_client for r in q]))
        return RunResult([RequestRecord(0.0, 2, 0.1, 0.2, [0.1, 0.2])], 1.0)

    monkeypatch.setattr(inprocess, "run_engine", fake_run)
    bench = _bench("--scheduling", "mixed,phase", "--concurrency", "2,4,8")
    bench.run_engine_policies(bundle=None)
    assert [(p, n) for p, n, _ in calls] == [("mixed", 2), ("phase", 2), ("phase", 4),
                                             ("mixed", 4), ("mixed", 8), ("phase", 8)]
    assert calls[0][2] == calls[1][2] and calls[2][2] == calls[3][2]  # the same requests
    assert [(r["system"], r["concurrency"]) for r in bench.runs][:2] == [
        ("engine[mixed]", 2), ("engine[phase]", 2)]
    assert "TOKENFLEET_SCHEDULING=phase" in bench.meta["system_notes"]["engine[phase]"]


def test_full_runs_one_fleet_per_policy_with_its_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fleets: list[tuple[str, dict[str, str]]] = []
    bench = _bench("--scheduling", "phase,mixed", "--systems", "full")
    monkeypatch.setattr(bench, "run_fleet", lambda system, env, *a, **k: fleets.append(
        (system, env)))
    bench.run_full()
    assert fleets == [("full[phase]", {"TOKENFLEET_SCHEDULING": "phase"}),
                      ("full[mixed]", {"TOKENFLEET_SCHEDULING": "mixed"})]
    plain: list[tuple[str, dict[str, str]]] = []
    default = _bench("--systems", "full")
    monkeypatch.setattr(default, "run_fleet", lambda system, env, *a, **k: plain.append(
        (system, env)))
    default.run_full()
    assert plain == [("full", {})]


def test_run_engine_drives_the_engine_of_the_policy_asked_for() -> None:
    import torch

    from bench.inprocess import Bundle, run_engine
    from bench.workload import PROMPTS, make_requests
    from tests.unit.tiny_model import tiny_engine, tiny_llama

    bundle = Bundle(loaded=None, prompt_ids={p: [1, 5 + i, 7, 9 + i]  # type: ignore[arg-type]
                                             for i, p in enumerate(PROMPTS)},
                    engine=tiny_engine(tiny_llama(torch.float32)))
    assert bundle.engine_for(None) is bundle.engine is bundle.engine_for("mixed")
    phase = bundle.engine_for("phase")
    assert phase is bundle.engine_for("phase") and phase.runner is bundle.engine.runner
    assert phase.scheduler.config.policy == "phase"
    counts = {}
    for policy in ("mixed", "phase"):
        load = ClosedLoop(cli.split_among_clients(make_requests("mixed", 6, 8), 3))
        result = run_engine(bundle, load, policy)  # type: ignore[arg-type]
        counts[policy] = sorted(r.output_tokens for r in result.records)
        assert all(r.error is None and r.first_token for r in result.records)
    assert counts["mixed"] == counts["phase"] == sorted(
        r.max_tokens for r in make_requests("mixed", 6, 8))


def test_shared_prefix_workload_compares_the_cache_on_and_off() -> None:
    from bench.workload import SYSTEM_PROMPT, make_requests

    bench = _bench("--workload", "shared-prefix")
    assert bench.variant_rows("engine") == [("engine[cache-on]", None, True),
                                            ("engine[cache-off]", None, False)]
    assert bench.prefix_env(False) == {"TOKENFLEET_PREFIX_CACHE_TOKENS": "0"}
    assert bench.prefix_env(True)["TOKENFLEET_PREFIX_CACHE_TOKENS"] != "0"
    assert _bench().variant_rows("full") == [("full", None, None)]
    crossed = _bench("--scheduling", "mixed,phase", "--prefix-cache", "off")
    assert [name for name, _, _ in crossed.variant_rows("engine")] == [
        "engine[mixed,cache-off]", "engine[phase,cache-off]"]
    with pytest.raises(SystemExit, match="--prefix-cache"):
        _bench("--prefix-cache", "maybe")
    reqs = make_requests("shared-prefix", 4)
    assert all(r.messages[0] == {"role": "system", "content": SYSTEM_PROMPT} for r in reqs)
    assert len({r.key for r in reqs}) == 4 and len({r.prompt for r in reqs}) == 4
    assert make_requests("mixed", 1)[0].messages == [
        {"role": "user", "content": make_requests("mixed", 1)[0].prompt}]


def test_engine_runs_cache_on_and_off_on_the_same_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import inprocess
    from bench.metrics import RequestRecord, RunResult

    calls: list[tuple[bool | None, int]] = []

    def fake_run(bundle: object, load: ClosedLoop, policy: str | None = None,
                 prefix_cache: bool | None = None) -> RunResult:
        calls.append((prefix_cache, load.num_clients))
        return RunResult([RequestRecord(0.0, 2, 0.1, 0.2, [0.1, 0.2])], 1.0)

    monkeypatch.setattr(inprocess, "run_engine", fake_run)
    bench = _bench("--workload", "shared-prefix", "--concurrency", "2,4")
    bench.run_engine_policies(bundle=None)
    assert calls == [(True, 2), (False, 2), (False, 4), (True, 4)]
    assert "prefix cache off" in bench.meta["system_notes"]["engine[cache-off]"]


def test_run_engine_with_the_prefix_cache_on_and_off() -> None:
    import torch

    from bench.inprocess import Bundle, run_engine
    from bench.workload import make_requests
    from tests.unit.tiny_model import tiny_engine, tiny_llama

    reqs = make_requests("shared-prefix", 6, 4)
    shared = list(range(3, 60))
    bundle = Bundle(loaded=None, engine=tiny_engine(tiny_llama(torch.float32)),  # type: ignore[arg-type]
                    prompt_ids={r.key: [1, *shared, 60 + r.index % 16] for r in reqs})
    off = bundle.engine_for(None, prefix_cache=False)
    on = bundle.engine_for(None, prefix_cache=True)
    assert off.prefix is None and on.prefix is not None and on.runner is off.runner
    for cache in (True, False):
        load = ClosedLoop(cli.split_among_clients(reqs, 2))
        result = run_engine(bundle, load, prefix_cache=cache)
        assert sorted(r.output_tokens for r in result.records) == [4] * 6
    assert on.stats().prefix_cache_hits >= 4  # the first two (in one step) miss
    assert off.stats().prefix_cache_hits == 0


def test_speculative_methods_run_as_rows_on_the_same_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import inprocess
    from bench.metrics import RequestRecord, RunResult

    calls: list[tuple[str | None, list[int]]] = []

    def fake_run(bundle: object, load: ClosedLoop, policy: str | None = None,
                 **kw: object) -> RunResult:
        calls.append((kw.get("speculative"), [r.index for q in load.per_client for r in q]))
        return RunResult([RequestRecord(0.0, 2, 0.1, 0.2, [0.1, 0.2])], 1.0)

    monkeypatch.setattr(inprocess, "run_engine", fake_run)
    bench = _bench("--speculative", "off,ngram", "--concurrency", "1,2", "--workload", "copy")
    bench.run_engine_policies(bundle=None)
    assert [c[0] for c in calls] == ["off", "ngram", "ngram", "off"]
    assert calls[0][1] == calls[1][1]
    assert [r["system"] for r in bench.runs][:2] == ["engine[spec=off]", "engine[spec=ngram]"]
    with pytest.raises(SystemExit, match="--speculative"):
        _bench("--speculative", "medusa")


def test_copy_workload_repeats_a_paragraph() -> None:
    from bench.workload import COPY_INSTRUCTION, COPY_MAX_TOKENS, make_requests

    reqs = make_requests("copy", 5)
    assert all(r.prompt.startswith(COPY_INSTRUCTION) for r in reqs)
    assert all(r.max_tokens == COPY_MAX_TOKENS for r in reqs)
    assert reqs[0].prompt != reqs[1].prompt and reqs[0].prompt == reqs[4].prompt


@pytest.mark.parametrize("flags", [("--concurrency", "1,1"), ("--concurrency", "4,32,4"),
                                   ("--baseline-concurrency", "32,32"),
                                   ("--mode", "open", "--rate", "2,2.0")])
def test_a_load_point_given_twice_is_refused_with_a_clear_message(flags: tuple[str, ...],
                                                                   ) -> None:
    with pytest.raises(SystemExit) as exc:
        _bench(*flags)
    assert "more than once" in str(exc.value) and flags[-2] in str(exc.value)


def test_distinct_load_points_are_kept_in_order() -> None:
    assert _bench("--concurrency", "32,1,4").concurrency == [32, 1, 4]
