"""bench.weight_formats: every format is timed or says why it cannot run."""

from __future__ import annotations

import pytest

from bench import weight_formats


def test_each_format_is_timed_or_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weight_formats, "SHAPES", {"tiny": (64, 32)})
    results = weight_formats.measure([1, 4], repeats=2)
    assert [(r["shape"], r["rows"]) for r in results] == [("tiny", 1), ("tiny", 4)]
    for row in results:
        for name in ("fp32", "bf16", "int8-torch"):  # plain torch: always runs
            assert isinstance(row[name], float) and row[name] > 0
        for name in ("bf16-packed", "ao-int8wo", "ao-da8w8", "bnb-int8", "bnb-nf4"):
            assert (isinstance(row[name], float) and row[name] > 0) or isinstance(row[name], str)
    table = weight_formats.markdown(results)
    assert table.splitlines()[0].startswith("| shape | rows | fp32 | bf16 |")
    assert "| tiny | 4 |" in table


def test_streamed_pass_times_each_format_and_rows() -> None:
    rows = weight_formats.measure_streamed(layers=1, rows=[1, 4], repeats=1)
    assert [(r["format"], r["rows"]) for r in rows][:2] == [("fp32 F.linear (MKL)", 1),
                                                           ("fp32 F.linear (MKL)", 4)]
    assert len(rows) == 6
    for r in rows:
        assert (isinstance(r["ms"], float) and r["ms"] > 0 and r["GB/s"] > 0) or isinstance(
            r["ms"], str)
