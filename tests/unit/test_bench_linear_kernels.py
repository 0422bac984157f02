"""bench.linear_kernels: it times both kernels at every row count asked for."""

from __future__ import annotations

import re

import pytest

from bench import linear_kernels
from worker.engine import native_linear


def test_prints_both_kernels_at_each_row_count(capsys: pytest.CaptureFixture[str]) -> None:
    why = native_linear.cpu_unsupported()
    if why is not None:
        pytest.skip(f"native linear unsupported here: {why}")
    linear_kernels.main(["--rows", "1,7", "--layers", "1", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "fp32" in out and "oneDNN packed" in out
    rows = re.findall(r"rows +(\d+) \| native +[\d.]+ ms .* \| torch +[\d.]+ ms .*"
                      r"native/torch time ([\d.]+)", out)
    assert [r for r, _ in rows] == ["1", "7"]
    assert all(float(ratio) > 0 for _, ratio in rows)
