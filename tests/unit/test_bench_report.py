"""Report shape: JSON file, Markdown (header, notes, CPU table, targets), plot, targets math."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.metrics import RequestRecord, summarize
from bench.report import COLUMNS, load_label, markdown, write
from bench.targets import compute_targets, decode_efficiency


def _row(system: str, clients: int, tps: float, **extra: Any) -> dict[str, Any]:
    return {"system": system, "concurrency": clients, "rate": None,
            "output_tokens_per_s": tps, "steady_tokens_per_s": tps, "requests_per_s": 1.0,
            "ttft_p99_ms": 100.0, **extra}


def _result(runs: list[dict[str, Any]], targets: list[dict[str, Any]] | None = None,
            ) -> dict[str, Any]:
    meta = {"date": "2026-01-01 00:00:00", "workload": "mixed", "mode": "closed",
            "model": "m", "dtype": "bfloat16", "command": "tokenfleet bench",
            "machine": {"cpus": 2, "cpu": "cpu", "commit": "abc"}, "matmul_gflops": 400.0,
            "parameters": 1000, "settings": {"max_batch_size": 64, "coalesce_ms": 15.0},
            "foreign_cores": 0.25, "loadavg_1m_end": 1.5,
            "system_notes": {"naive": "serial", "bus": "not in this run"}}
    return {"meta": meta, "runs": runs, "targets": targets or []}


def test_markdown_has_machine_settings_noise_notes_and_a_cpu_table() -> None:
    runs = [_row("naive", 1, 20.0), _row("full", 4, 90.0, cpu_cores={"loadgen": 0.1,
                                                                      "gateway": 0.2})]
    text = markdown(_result(runs))
    assert "commit `abc`" in text and "400 GFLOP/s" in text and "1,000" in text
    assert "Settings: max_batch_size=64, coalesce_ms=15.0." in text
    assert "0.25 cores on average" in text
    assert "- `naive`: serial" in text and "not in this run" not in text  # only systems run
    assert "| loadgen | gateway |" in text and "| full | 4 | 0.10 | 0.20 |" in text
    header = next(line for line in text.splitlines() if line.startswith("| system | conc."))
    assert header.count("|") == len(COLUMNS) + 1


def test_open_loop_rows_show_the_rate() -> None:
    assert load_label({"concurrency": None, "rate": 4.0}) == "4/s"
    assert load_label({"concurrency": 32, "rate": None}) == "32"


def test_targets_come_from_the_rows_and_say_when_an_input_is_missing() -> None:
    runs = [_row("full", 32, 300.0), _row("static", 32, 60.0), _row("naive", 1, 10.0),
            _row("engine", 32, 320.0), _row("engine", 64, 350.0), _row("full", 64, 330.0),
            {"system": "bus", "concurrency": 128, "rate": None, "requests_per_s": 750.0},
            {"system": "bus-2gw", "concurrency": 128, "rate": None, "requests_per_s": 1400.0}]
    meta = {"matmul_gflops": 400.0, "parameters": 134_515_008}
    targets = {t["name"]: t for t in compute_targets(runs, meta)}
    assert targets["full / static batching, 32 clients"]["value"] == 5.0
    assert targets["full / static batching, 32 clients"]["met"] is True
    assert targets["full at 32 clients / naive (serial)"]["value"] == 30.0
    cb = targets["full / transformers CB, 32 clients"]
    assert cb["value"] is None and cb["met"] is None  # hf-cb did not run: never guessed
    assert targets["full / in-process engine, 32 clients"]["value"] == pytest.approx(0.94)
    eff = targets["decode efficiency, engine at 64 clients"]
    assert eff["value"] == decode_efficiency(350.0, 134_515_008, 400e9)
    assert math.isclose(eff["value"], 350 * 2 * 134_515_008 / 400e9, abs_tol=1e-3)
    bus = targets["bus requests/s, 2 gateway processes"]  # the one-process row is no target
    assert bus["value"] == 1400.0 and bus["met"] is False and bus["goal"] == ">= 2,000"


def test_batch_targets_compare_with_the_full_path_and_the_idle_fleet() -> None:
    runs = [{**_row("full", 64, 300.0), "steady_tokens_per_s": 300.0},
            {"system": "batch", "concurrency": None, "rate": None,
             "output_tokens_per_s": 285.0},
            {"system": "interactive", "concurrency": 4, "rate": None, "ttft_p99_ms": 100.0},
            {"system": "interactive+batch", "concurrency": 4, "rate": None,
             "ttft_p99_ms": 250.0}]
    targets = {t["name"]: t for t in compute_targets(runs, {})}
    throughput = targets["batch tok/s / full steady at 64 clients"]
    assert throughput["value"] == 0.95 and throughput["met"] is True
    slowdown = targets["interactive TTFT p99 during a batch / idle"]
    assert slowdown["value"] == 2.5 and slowdown["met"] is False  # a "<=" goal
    targets = {t["name"]: t for t in compute_targets(runs[:1], {})}
    assert targets["interactive TTFT p99 during a batch / idle"]["met"] is None


def test_decode_efficiency_is_none_without_inputs() -> None:
    assert decode_efficiency(None, 10, 1.0) is None
    assert decode_efficiency(5.0, 0, 1.0) is None


def test_write_produces_json_markdown_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    recs = [RequestRecord(0.0, 4, 0.1, 0.4, [0.1, 0.2, 0.3, 0.4], client=c) for c in (0, 1)]
    summary = summarize(recs, wall_s=0.5, mean_batch=2.0)
    runs = [{"system": s, "concurrency": c, "rate": None, **summary}
            for s in ("engine", "full") for c in (1, 4)]
    runs.append({"system": "hf-cb", "concurrency": 4, "rate": None,
                 "note": "did not run: RuntimeError: no"})
    append_to = tmp_path / "benchmarks.md"
    append_to.write_text("# Benchmarks\n")
    path = write(_result(runs), tmp_path / "out", append_to)
    data = json.loads(path.read_text())
    assert data["runs"][0]["output_tokens_per_s"] == 16.0
    assert data["meta"]["plot"] and Path(data["meta"]["plot"]).stat().st_size > 1000
    assert path.with_suffix(".md").read_text().startswith("### Run of 2026-01-01")
    doc = append_to.read_text()
    assert doc.startswith("# Benchmarks\n") and "did not run: RuntimeError: no" in doc


def test_write_without_append_leaves_the_doc_alone(tmp_path: Path) -> None:
    write(_result([_row("engine", 1, 10.0)]), tmp_path, None)
    assert sorted(p.suffix for p in tmp_path.iterdir()) in ([".json", ".md", ".png"],
                                                           [".json", ".md"])


def test_a_policy_comparison_gets_its_own_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [_row(f"engine[{p}]", c, 10.0 * c, ttft_p50_ms=50.0, itl_p50_ms=20.0,
                 itl_p99_ms=90.0) for p in ("mixed", "phase") for c in (16, 32)]
    data = json.loads(write(_result(runs), tmp_path / "a", None).read_text())
    assert data["meta"]["plot"] and data["meta"]["scheduling_plot"]
    assert Path(data["meta"]["scheduling_plot"]).stat().st_size > 1000
    plain = json.loads(write(_result([_row("engine", 1, 10.0)]), tmp_path / "b", None)
                       .read_text())
    assert plain["meta"]["scheduling_plot"] is None


def test_shared_prefix_targets_compare_cache_on_with_off() -> None:
    def row(system: str, clients: int, ttft: float, tps: float) -> dict[str, object]:
        return {"system": system, "concurrency": clients, "rate": None, "ttft_p50_ms": ttft,
                "steady_tokens_per_s": tps, "output_tokens_per_s": tps * 0.9}

    runs = [row("engine[cache-on]", 16, 100.0, 400.0), row("engine[cache-off]", 16, 420.0,
                                                           250.0),
            row("engine[cache-on]", 8, 50.0, 300.0), row("engine[cache-off]", 8, 60.0, 290.0)]
    targets = {t["name"]: t for t in compute_targets(runs, {})}
    ttft = targets["shared prefix, engine at 16 clients: TTFT p50 cache off / on"]
    assert (ttft["value"], ttft["met"], ttft["goal"]) == (4.2, True, ">= 3x")
    tps = targets["shared prefix, engine at 16 clients: tok/s cache on / off"]
    assert (tps["value"], tps["whole_run"], tps["met"]) == (1.6, 1.6, True)
    full = targets["shared prefix, full at 32 clients: TTFT p50 cache off / on"]
    assert full["value"] is None and full["met"] is None  # full did not run: never guessed
    eff = targets["decode efficiency, engine at 64 clients"]
    assert eff["goal"] == ">= 0.45"
