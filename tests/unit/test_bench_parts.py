"""Bench building blocks: workloads, percentiles, SSE parsing, report shape."""

from __future__ import annotations

from bench.http_load import chunk_text, parse_sse_line
from bench.metrics import RequestRecord, percentile, summarize
from bench.report import COLUMNS, markdown
from bench.workload import MIXED_MAX_TOKENS, make_requests, split_among_clients


def test_mixed_workload_cycles_the_exact_budgets() -> None:
    reqs = make_requests("mixed", 20)
    assert [r.max_tokens for r in reqs[:8]] == [16, 256, 32, 128, 64, 16, 32, 64]
    assert [r.max_tokens for r in reqs[8:16]] == list(MIXED_MAX_TOKENS)
    assert all(r.max_tokens == 64 for r in make_requests("uniform", 5))
    assert max(r.max_tokens for r in make_requests("mixed", 8, max_tokens_cap=8)) == 8


def test_closed_loop_split_gives_every_request_to_exactly_one_client() -> None:
    reqs = make_requests("mixed", 10)
    parts = split_among_clients(reqs, 4)
    assert sorted(r.index for part in parts for r in part) == list(range(10))
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    cycle = split_among_clients(make_requests("mixed", 16 * 8), 16)
    assert {sum(r.max_tokens for r in part) for part in cycle} == {sum(MIXED_MAX_TOKENS)}
    assert [part[0].max_tokens for part in cycle[:8]] == list(MIXED_MAX_TOKENS)  # own phase


def test_percentiles_interpolate() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.5
    assert percentile(values, 99) == 99.01
    assert percentile([], 50) is None


def test_summary_of_synthetic_timings() -> None:
    a = RequestRecord(submitted=0.0, output_tokens=3, first_token=0.1, finished=0.3,
                      token_times=[0.1, 0.2, 0.3])
    b = RequestRecord(submitted=0.0, output_tokens=2, first_token=0.2, finished=0.4,
                      token_times=[0.2, 0.4])
    bad = RequestRecord(submitted=0.0, error="HTTP 500")
    s = summarize([a, b, bad], wall_s=0.5, mean_batch=2.0)
    assert s["output_tokens"] == 5 and s["errors"] == 1 and s["requests"] == 3
    assert s["output_tokens_per_s"] == 10.0 and s["requests_per_s"] == 4.0
    assert s["ttft_p50_ms"] == 150.0
    assert s["itl_p50_ms"] == 100.0 and s["itl_p99_ms"] == 198.0
    assert s["e2e_p99_ms"] == 399.0 and s["mean_batch"] == 2.0


def test_sse_parsing() -> None:
    assert parse_sse_line("data: [DONE]") == ("done", None)
    assert parse_sse_line("event: restart") == ("", None)
    kind, chunk = parse_sse_line('data: {"choices":[{"delta":{"content":"Hi"}}]}')
    assert kind == "data" and chunk is not None and chunk_text(chunk) == "Hi"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_markdown_report_has_a_row_per_run_and_the_targets() -> None:
    result = {
        "meta": {"date": "2026-01-01 00:00:00", "workload": "mixed", "mode": "closed",
                 "model": "m", "dtype": "bfloat16", "command": "tokenfleet bench",
                 "machine": {"cpus": 2, "cpu": "cpu", "commit": "abc"},
                 "matmul_gflops": 400.0, "parameters": 1000},
        "runs": [{"system": "engine", "concurrency": 4, "output_tokens_per_s": 100.0},
                 {"system": "hf-cb", "concurrency": 32, "note": "did not run: X"}],
        "targets": [{"name": "t", "value": 1.5, "whole_run": 1.2, "goal": ">= 2",
                     "met": False}],
    }
    text = markdown(result)
    header = next(line for line in text.splitlines() if line.startswith("| system"))
    assert header.count("|") == len(COLUMNS) + 1
    assert "| engine | 4 | 100.0 | n/a |" in text
    assert "did not run: X" in text and "| t | 1.50 | 1.20 | >= 2 | **no** |" in text


def test_steady_window_ends_when_the_first_client_runs_dry() -> None:
    from bench.metrics import steady_window

    a = RequestRecord(0.0, 2, 0.5, 1.0, [0.5, 1.0], client=0)
    b = RequestRecord(0.0, 4, 0.5, 3.0, [0.5, 1.0, 2.0, 3.0], client=1)
    assert steady_window([a, b]) == (0.0, 1.0)
    s = summarize([a, b], wall_s=3.0)
    assert s["steady_tokens_per_s"] == 4.0  # 2 + 2 tokens by t=1.0
    assert s["output_tokens_per_s"] == 2.0
