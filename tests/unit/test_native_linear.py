"""The native fp32 linear kernel (``TOKENFLEET_LINEAR=native``): F.linear's values, a row's
result bitwise the same at any row count, the runner through it (no padding, batch
invariance, one-pass mixed steps), and the fallbacks when it cannot be used."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from tests.unit.test_engine import greedy, prompt, run_all, tokens
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine import native_linear
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import PrefillChunk, TransformerRunner
from worker.engine.types import EngineRequest


@pytest.fixture(scope="module")
def kernel() -> native_linear.Kernel:
    why = native_linear.cpu_unsupported()
    if why is not None:
        pytest.skip(f"native linear unsupported here: {why}")
    try:
        return native_linear.load()
    except native_linear.NativeLinearError as exc:  # no C compiler on this machine
        pytest.skip(f"native linear unavailable: {exc}")


@pytest.mark.parametrize("out_features,in_features", [(96, 64), (16, 7), (32, 1536)])
def test_rows_round_alike_at_every_row_count(kernel: native_linear.Kernel, out_features: int,
                                             in_features: int) -> None:
    """Every row count (the 6-row blocks and the rows left over) gives a row bitwise one
    result, within rounding of F.linear."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(out_features, in_features, generator=gen)
    packed = native_linear.pack(weight)
    x = torch.randn(70, in_features, generator=gen)
    full = kernel.linear(x, packed)
    torch.testing.assert_close(full, F.linear(x, weight), rtol=1e-5, atol=1e-4)
    for rows in range(1, 71):
        assert torch.equal(kernel.linear(x[:rows], packed), full[:rows]), rows
    assert torch.equal(kernel.linear(x[5:9], packed), full[5:9])  # not where it starts either
    assert kernel.linear(x[:0], packed).shape == (0, out_features)


def test_shapes_it_cannot_run_are_refused(kernel: native_linear.Kernel) -> None:
    with pytest.raises(ValueError, match="12 features"):
        kernel.linear(torch.zeros(2, 12), native_linear.pack(torch.zeros(16, 8)))
    assert "multiple of 16" in (native_linear.unsupported(torch.zeros(24, 8), None) or "")
    assert "bias" in (native_linear.unsupported(torch.zeros(16, 8), torch.zeros(16)) or "")


def _native_runner(model: torch.nn.Module) -> TransformerRunner:
    runner = TransformerRunner(model)
    assert native_linear.attach(runner, "native")
    return runner


def test_runner_through_the_kernel_agrees_with_torch_and_never_pads(
        kernel: native_linear.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama(torch.float32)
    native, plain = _native_runner(model), TransformerRunner(model)
    assert native.native_linear and native.rows_invariant
    assert isinstance(native.lm_head_packed, native_linear.NativeLinear)
    seen: list[int] = []
    real = native_linear.Kernel.linear

    def counting(self: native_linear.Kernel, x: torch.Tensor,
                 w: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return real(self, x, w)

    monkeypatch.setattr(native_linear.Kernel, "linear", counting)
    ids = prompt(9)
    logits = []
    for runner in (native, plain):
        runner.cache.allocate("a")
        runner.cache.ensure_capacity(1, 16)
        logits.append(runner.prefill([PrefillChunk(0, 0, ids, True)]))
        runner.cache.advance("a", len(ids))
        logits.append(runner.decode([5], [len(ids)]))
    torch.testing.assert_close(logits[0], logits[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], logits[3], rtol=1e-4, atol=1e-4)
    assert 1 in seen and set(seen) <= {1, len(ids)}  # the lone decode row: never padded


def _native_engine(model: torch.nn.Module) -> LLMEngine:
    engine = tiny_engine(model)  # type: ignore[arg-type]
    assert isinstance(engine.runner, TransformerRunner)
    assert native_linear.attach(engine.runner, "native")
    return engine


def test_a_requests_tokens_do_not_depend_on_its_batch(kernel: native_linear.Kernel) -> None:
    """Alone, and among four others that arrive while it decodes (mixed steps run in one
    pass: ``rows_invariant``): bitwise the same greedy tokens."""
    model = tiny_llama(torch.float32, seed=2)
    alone = _native_engine(model)
    alone.add_request(EngineRequest("a", prompt(11), greedy(20)))
    expected = tokens(run_all(alone)["a"])
    crowded = _native_engine(model)
    crowded.add_request(EngineRequest("a", prompt(11), greedy(20)))
    first = [out for _ in range(3) for out in crowded.step() if out.id == "a"]
    for i in range(4):
        crowded.add_request(EngineRequest(f"b{i}", prompt(5 + 7 * i, i + 1), greedy(12)))
    assert tokens(first + run_all(crowded)["a"]) == expected


def test_bf16_keeps_torchs_kernels_with_a_warning(kernel: native_linear.Kernel,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    runner = TransformerRunner(tiny_llama(torch.bfloat16))
    before = runner.lm_head_packed
    with caplog.at_level(logging.WARNING, logger="worker.engine.native_linear"):
        assert native_linear.attach(runner, "native") is False
    assert "float32 only" in caplog.text
    assert not runner.native_linear and runner.lm_head_packed is before
    assert native_linear.attach(runner, "torch") is False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker.engine.native_linear"):
        assert native_linear.attach(runner, "auto") is False  # bf16: not its dtype, quietly
    assert caplog.text == "" and runner.lm_head_packed is before


def test_auto_takes_the_kernel_for_fp32(kernel: native_linear.Kernel) -> None:
    runner = TransformerRunner(tiny_llama(torch.float32))
    assert native_linear.attach(runner, "auto") and runner.native_linear


def test_a_missing_compiler_keeps_torchs_kernels(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def no_compiler(cache_dir: object = None) -> native_linear.Kernel:
        raise native_linear.NativeLinearError("no C compiler (cc or gcc) on PATH")

    if native_linear.cpu_unsupported() is not None:
        pytest.skip("the CPU check refuses first here")
    monkeypatch.setattr(native_linear, "load", no_compiler)
    runner = TransformerRunner(tiny_llama(torch.float32))
    with caplog.at_level(logging.WARNING, logger="worker.engine.native_linear"):
        assert native_linear.attach(runner, "native") is False
    assert "no C compiler" in caplog.text and not runner.native_linear


def test_a_quantized_model_keeps_its_kernels(kernel: native_linear.Kernel,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """int8-torch swaps the Linears for Int8Linear (no plain weight): ``auto`` leaves it be,
    ``native`` says why."""
    from worker.engine.weight_int8 import quantize_model

    runner = TransformerRunner(quantize_model(tiny_llama(torch.float32), torch.float32))
    before = runner.lm_head_packed
    assert native_linear.attach(runner, "auto") is False
    with caplog.at_level(logging.WARNING, logger="worker.engine.native_linear"):
        assert native_linear.attach(runner, "native") is False
    assert "Int8Linear" in caplog.text
    assert not runner.native_linear and runner.lm_head_packed is before
