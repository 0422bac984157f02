"""``tokenfleet bench --systems quant``: wiring, the table, and the quality measures."""

from __future__ import annotations

import argparse

import pytest

from bench import cli, quant
from bench.report import markdown
from shared.settings import Settings
from tests.unit.tiny_model import tiny_llama


def _bench(*argv: str) -> cli.Bench:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.Bench(parser.parse_args(list(argv)), Settings())


def test_quant_system_runs_the_modes_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[str, ...], tuple[int, ...], int]] = []

    def fake_run_modes(settings: Settings, modes: tuple[str, ...], batches: tuple[int, ...],
                       max_tokens: int) -> list[quant.ModeResult]:
        calls.append((modes, batches, max_tokens))
        return [quant.ModeResult(m, "bfloat16", 1.0, 100.0, {b: 10.0 for b in batches})
                for m in modes]

    monkeypatch.setattr(quant, "run_modes", fake_run_modes)
    bench = _bench("--systems", "quant", "--quant-modes", "none,int8-torch", "--quick")
    assert bench.systems == ["quant"]
    quant.run_quant(bench)
    assert calls == [(("none", "int8-torch"), (1, 8), 4)]
    assert [r["mode"] for r in bench.meta["quantization"]] == ["none", "int8-torch"]
    assert "| int8-torch | bfloat16 | 100.0 | 10.0 | 10.0 |" in bench.meta["quantization_table"]


def test_the_report_carries_the_quantization_table() -> None:
    table = quant.markdown([quant.ModeResult("none", "bfloat16", 1.5, 256.0, {1: 30.0},
                                             agreement=1.0, perplexity=12.345)], (1,))
    meta = {"machine": {"cpu": "x", "cpus": 2, "commit": "abc"},
            "date": "d", "workload": "mixed", "mode": "closed", "model": "m", "dtype": "bf16",
            "command": "c", "settings": {}, "parameters": 1, "matmul_gflops": 1.0,
            "quantization_table": table}
    text = markdown({"meta": meta, "runs": [], "targets": []})
    assert table in text and "| 100% | 12.35 |" in text


def test_agreement_counts_the_shared_greedy_prefix() -> None:
    assert quant.agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert quant.agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [7, 6]]) == 0.25


def test_perplexity_of_a_model_on_a_token_sequence() -> None:
    model = tiny_llama()
    ids = [(i * 7) % 90 + 3 for i in range(40)]
    value = quant.perplexity(model, ids, window=16)
    assert 1.0 < value < 10_000.0
    assert quant.perplexity(model, ids, window=16) == value  # deterministic


def test_mode_settings_maps_the_float32_row() -> None:
    s = quant.mode_settings(Settings(), "none-float32")
    assert (s.quantization, s.dtype) == ("none", "float32")
    assert quant.mode_settings(Settings(), "nf4").quantization == "nf4"


def test_the_shipped_text_is_there() -> None:
    assert len(quant.TEXT.read_text().split()) > 500
