"""``auto``'s quality data is the checked-in measurement (bench/data/quant_quality.json),
and the choice follows it: a mode is picked only within the stated perplexity bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worker.engine.quant_choice import (
    MAX_PERPLEXITY_INCREASE,
    MEASURED_QUALITY,
    MIN_SPEEDUP,
    Capabilities,
    choose_quantization,
    measured_quality,
    quality_from_report,
)

REPORT = Path(__file__).resolve().parents[2] / "bench" / "data" / "quant_quality.json"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(REPORT.read_text())


def test_measured_quality_is_what_the_checked_in_report_supports(report: dict) -> None:
    derived = quality_from_report(report)
    assert derived, "the report has no 'none' reference with a perplexity"
    for key, modes in derived.items():
        assert MEASURED_QUALITY.get(key) == modes, key
    assert set(MEASURED_QUALITY) == set(derived)


def test_the_report_states_how_it_was_made(report: dict) -> None:
    assert report["command"].startswith("python -m bench.quant")
    assert report["machine"]["cpu_capability"]
    assert Path(REPORT.parents[2], report["text"]).is_file()


def test_auto_follows_the_measured_bound(report: dict) -> None:
    """With every mode fast enough, exactly the modes within the bound are candidates, and
    the fastest of them wins; above the bound a mode is refused whatever its speed."""
    for (model, dtype), quality in quality_from_report(report).items():
        caps = Capabilities("cpu", getattr(torch, dtype), "AVX512")
        assert measured_quality(model, caps.compute_dtype) == quality
        within = {m for m, q in quality.items() if q.perplexity_increase <= MAX_PERPLEXITY_INCREASE}
        speedups = {m: MIN_SPEEDUP + 0.1 * i for i, m in enumerate(sorted(quality))}
        choice = choose_quantization(caps, speedups, quality)
        if within:
            assert choice.mode == max(within, key=lambda m: speedups[m])
        else:
            assert choice.mode == "none"
        for mode in set(quality) - within:
            alone = choose_quantization(caps, {mode: 10.0}, quality)
            assert alone.mode == "none" and "perplexity" in alone.reason


def test_unmeasured_models_and_dtypes_get_no_quality() -> None:
    assert measured_quality("some-other-model", torch.bfloat16) == {}
    for model, _ in MEASURED_QUALITY:
        assert measured_quality(model, torch.float64) == {}
