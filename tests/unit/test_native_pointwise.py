"""The native pointwise kernels (``TOKENFLEET_POINTWISE``): each call against the torch
operations it replaces, the runner through them against the runner without them (greedy
tokens, logits, a prefill chunk beside decode rows, batch invariance), and the fallbacks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.unit.test_engine import (
    alone_and_in_a_batch,
    four_requests_tokens,
    prompt,
)
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine import native_pointwise
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import PrefillChunk, TransformerRunner, _rotate

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def kernel() -> native_pointwise.NativePointwise:
    try:
        return native_pointwise.load()
    except native_pointwise.NativePointwiseError as exc:  # no C compiler on this machine
        pytest.skip(f"native pointwise kernels unavailable: {exc}")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of ``a``'s dtype (same-sign finite values)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


def _rand(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [576, 40])  # SmolLM2's width; one with a scalar tail
def test_norm_and_residual_sum_are_llamas_rmsnorm(kernel: native_pointwise.NativePointwise,
                                                  dtype: torch.dtype, dim: int) -> None:
    norm = LlamaRMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_rand(dim, dtype=dtype, seed=1))
    h, delta = _rand(33, dim, dtype=dtype, seed=2, scale=3), _rand(33, dim, dtype=dtype, seed=3)
    got = kernel.norm(h, norm.weight, 1e-5)
    want = norm(h)
    # the mean square is summed in another order: at most one ulp of fp32, rarely a bf16 one
    assert int(_ulps(got, want).max()) <= (1 if dtype == torch.bfloat16 else 4)
    assert float((got != want).float().mean()) < (0.01 if dtype == torch.bfloat16 else 1.0)
    summed, normed = kernel.add_norm(h, delta, norm.weight, 1e-5)
    assert torch.equal(summed, h + delta)  # the residual sum: bitwise torch's
    assert int(_ulps(normed, norm(h + delta)).max()) <= (1 if dtype == torch.bfloat16 else 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 8])  # vector halves; a scalar head
def test_rope_splits_and_rotates_bitwise_as_torch(kernel: native_pointwise.NativePointwise,
                                                  dtype: torch.dtype, head_dim: int) -> None:
    n, heads, kv = 7, 6, 2
    qkv = _rand(n, heads + 2 * kv, head_dim, dtype=dtype, seed=4)
    cos = _rand(n, 1, head_dim, dtype=dtype, seed=5)
    sin = _rand(n, 1, head_dim, dtype=dtype, seed=6)
    q, k, v = kernel.rope(qkv, cos, sin, heads, kv)
    qk = _rotate(qkv[:, :heads + kv], cos, sin)
    assert torch.equal(q, qk[:, :heads]) and torch.equal(k, qk[:, heads:])
    assert torch.equal(v, qkv[:, heads + kv:])
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    with pytest.raises(ValueError, match="heads"):
        kernel.rope(qkv, cos, sin, heads, kv + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 30])  # one thread; split across threads (>= 32,768)
def test_silu_mul_is_the_gated_activation(kernel: native_pointwise.NativePointwise,
                                          dtype: torch.dtype, rows: int) -> None:
    inter = 1536 + 7  # a scalar tail
    gate_up = _rand(rows, 2 * inter, dtype=dtype, seed=7, scale=4)
    gate_up[0, :6] = torch.tensor([-100.0, -88.5, -20.0, 0.0, 30.0, 100.0])
    gate, up = gate_up.chunk(2, dim=-1)
    got, want = kernel.silu_mul(gate_up), F.silu(gate).mul_(up)
    assert got.shape == want.shape
    assert float((got != want).float().mean()) < 0.01
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16
                               else 1e-6, atol=1e-30)


def _pointwise_engine(model: torch.nn.Module,
                      kernel: native_pointwise.NativePointwise) -> LLMEngine:
    engine = tiny_engine(model)  # type: ignore[arg-type]
    assert isinstance(engine.runner, TransformerRunner)
    engine.runner.pointwise = kernel
    return engine


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_tokens_are_those_of_the_torch_operations(
        kernel: native_pointwise.NativePointwise, dtype: torch.dtype) -> None:
    model = tiny_llama(dtype)
    assert four_requests_tokens(_pointwise_engine(model, kernel)) == four_requests_tokens(
        tiny_engine(model))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_mixed_steps_logits_are_close_to_the_torch_operations(
        kernel: native_pointwise.NativePointwise, dtype: torch.dtype) -> None:
    model = tiny_llama(dtype)
    logits = []
    for native in (False, True):
        runner = TransformerRunner(model)
        runner.pointwise = kernel if native else None
        runner.cache.ensure_capacity(3, 64)
        for i in range(3):
            runner.cache.allocate(f"r{i}")
        runner.prefill([PrefillChunk(i, 0, prompt(9 + 4 * i, i), False) for i in range(2)])
        out = runner.decode_and_prefill([5, 6], [9, 13], [PrefillChunk(2, 0, prompt(11), True)])
        logits.append(out)
    assert logits[1].shape == (3, runner.vocab_size)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits[1], logits[0], rtol=tol, atol=tol)


def test_a_requests_tokens_do_not_depend_on_its_batch(
        kernel: native_pointwise.NativePointwise) -> None:
    model = tiny_llama(torch.bfloat16)
    alone, in_batch = alone_and_in_a_batch(lambda: _pointwise_engine(model, kernel))
    assert in_batch == alone


def test_attach_uses_the_kernels_and_falls_back_with_a_reason(
        kernel: native_pointwise.NativePointwise, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    runner = TransformerRunner(tiny_llama(torch.float32))
    assert native_pointwise.attach(runner, "torch") is False and runner.pointwise is None
    assert native_pointwise.attach(runner, "auto") is True and runner.pointwise is not None

    class ShiftedNorm(LlamaRMSNorm):  # Gemma's arithmetic: (1 + weight) * normalized
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states) + hidden_states * 0 + 1

    shifted = ShiftedNorm(runner.hidden_size)
    runner.final_norm = shifted
    with caplog.at_level(logging.WARNING, logger="worker.engine.native_pointwise"):
        assert native_pointwise.attach(runner, "native") is False
    assert runner.pointwise is None and "ShiftedNorm" in caplog.text

    def no_compiler(cache_dir: Path | None = None) -> native_pointwise.NativePointwise:
        raise native_pointwise.NativePointwiseError("no C compiler (cc or gcc) on PATH")

    monkeypatch.setattr(native_pointwise, "load", no_compiler)
    runner = TransformerRunner(tiny_llama(torch.float32))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker.engine.native_pointwise"):
        assert native_pointwise.attach(runner, "auto") is False
    assert "no C compiler" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # auto: quietly


def test_a_missing_compiler_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native_pointwise.NativePointwiseError, match="no-such-cc"):
        native_pointwise.build(tmp_path / "cache")
