"""`tokenfleet bench --quick` runs every system and writes well-formed results (not speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import SYSTEMS
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
    assert {"date", "model", "dtype", "parameters", "matmul_gflops", "machine"} <= set(
        result["meta"])
    assert result["meta"]["parameters"] > 100_000_000
    assert {row["system"] for row in result["runs"]} == set(SYSTEMS)
    for row in result["runs"]:
        assert "note" not in row or not row["note"].startswith("did not run"), row
        for key in METRICS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row, key)
        assert row["errors"] == 0 and row["output_tokens_per_s"] > 0
    assert list(tmp_path.glob("bench-*.png")) and list(tmp_path.glob("bench-*.md"))
