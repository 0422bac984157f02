"""`tokenfleet bench --quick` runs every system and writes well-formed results (not speed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import DEFAULT_SYSTEMS
from tests.integration.fleet import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

METRICS = ("output_tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms",
           "e2e_p50_ms", "e2e_p99_ms", "requests", "errors")


def test_quick_bench_output_is_well_formed(tmp_path: Path, smollm2_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path),
                           "--no-append"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("bench-*.json")
    result = json.loads(path.read_text())
    meta = result["meta"]
    assert {"date", "model", "dtype", "parameters", "matmul_gflops", "machine", "settings",
            "command", "foreign_cores"} <= set(meta)
    assert meta["parameters"] > 100_000_000 and meta["matmul_gflops"] > 0
    assert {"cpus", "cpu", "commit", "cpu_flags", "torch_cpu_capability", "cpu_bf16"} <= set(
        meta["machine"])
    assert set(meta["machine"]["cpu_flags"]) == {"AVX2", "AVX-512", "AVX512-BF16", "AMX"}
    assert meta["matmul_dtype"] == meta["dtype"]  # the yardstick runs in the engine's dtype
    if os.environ.get("TOKENFLEET_DTYPE", "auto") == "auto":  # bf16 only where it is native
        assert meta["dtype"] == ("bfloat16" if meta["machine"]["cpu_bf16"] else "float32")
    assert {row["system"] for row in result["runs"]} == set(DEFAULT_SYSTEMS)
    for row in result["runs"]:
        assert "note" not in row or not row["note"].startswith("did not run"), row
        for key in METRICS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row, key)
        assert row["errors"] == 0 and row["output_tokens_per_s"] > 0
        assert row["requests_per_s"] > 0 and row["ttft_p50_ms"] > 0
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"] <= row["e2e_p99_ms"] + 1e-6
        if row["system"] in ("hf-cb", "engine", "full", "bus"):  # these stream: gaps exist
            assert row["itl_p50_ms"] is not None and row["itl_p50_ms"] >= 0
        if row["system"] in ("full", "bus"):
            assert {"loadgen", "gateway", "worker0", "redis"} <= set(row["cpu_cores"])
    assert result["targets"] == []  # --quick: shape, not speed
    [png] = tmp_path.glob("bench-*.png")
    assert png.stat().st_size > 1000 and meta["plot"] == str(png)
    [md] = tmp_path.glob("bench-*.md")
    assert md.read_text().count("\n| engine |") == 2
    assert f"Yardstick: {meta['dtype']} matmul" in md.read_text()


def test_quick_open_loop_reports_rates(tmp_path: Path, smollm2_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--mode", "open", "--rate",
                           "20", "--systems", "engine,naive,full", "--out", str(tmp_path),
                           "--no-append"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("bench-*.json")
    result = json.loads(path.read_text())
    assert result["meta"]["mode"] == "open"
    assert {(row["system"], row["rate"]) for row in result["runs"]} == {
        ("engine", 20.0), ("naive", 20.0), ("full", 20.0)}
    for row in result["runs"]:
        assert row["errors"] == 0 and row["requests"] == 2 and row["output_tokens_per_s"] > 0
        assert row["steady_tokens_per_s"] is None  # no clients to run dry in an open loop
    assert "| engine | 20/s |" in path.with_suffix(".md").read_text()


def test_quick_batch_systems_report_throughput_interference_and_memory(
        tmp_path: Path, smollm2_dir: Path) -> None:
    """``--systems batch,batch-rss``: the batch's own row, the interactive clients idle and
    during the batch, and the orchestrator's memory by progress (issue 8's measurements)."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--systems",
                           "batch,batch-rss", "--out", str(tmp_path), "--no-append"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("bench-*.json")
    rows = {row["system"]: row for row in json.loads(path.read_text())["runs"]}
    assert set(rows) == {"interactive", "interactive+batch", "batch", "batch-rss"}, rows
    for row in rows.values():
        assert not row.get("note", "").startswith("did not run"), row
        assert row["errors"] == 0
    batch = rows["batch"]
    assert batch["requests"] == 64 and batch["output_tokens"] == sum(
        min(m, 8) for m in (16, 256, 32, 128, 64, 16, 32, 64)) * 8
    assert batch["output_tokens_per_s"] > 0
    for name in ("interactive", "interactive+batch"):
        assert rows[name]["requests"] == 32 and rows[name]["ttft_p99_ms"] > 0
    memory = rows["batch-rss"]
    assert memory["requests"] == 2000
    assert memory["orchestrator_peak_rss_mib"] > 10
    assert set(memory["orchestrator_rss_at_progress_mib"]) >= {"0.1", "0.5", "0.99"}
