"""The native decode attention (``TOKENFLEET_ATTENTION=native``): the C kernel against the
torch attention, reading only each row's own keys, batch invariance, speculative
verification through the same kernel, and the fallbacks when it cannot be used."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.unit.test_engine import (
    alone_and_in_a_batch,
    four_requests_tokens,
    greedy,
    prompt,
    run_all,
    tokens,
)
from tests.unit.tiny_model import VOCAB, tiny_engine, tiny_llama
from worker.engine import native_attention
from worker.engine.engine import LLMEngine
from worker.engine.model_runner import PrefillChunk, TransformerRunner
from worker.engine.speculative import SpeculativeConfig
from worker.engine.types import EngineRequest


def _wide_heads_llama() -> torch.nn.Module:
    """bf16, SmolLM2's head shape (head_dim 64, groups of 3): long enough sums that a
    different summation order shows in bf16 results."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def kernel() -> native_attention.NativeAttention:
    try:
        return native_attention.load()
    except native_attention.NativeAttentionError as exc:  # no C compiler on this machine
        pytest.skip(f"native attention unavailable: {exc}")


def _native_engine(model: torch.nn.Module, kernel: native_attention.NativeAttention,
                   **overrides: object) -> LLMEngine:
    engine = tiny_engine(model, **overrides)  # type: ignore[arg-type]
    assert isinstance(engine.runner, TransformerRunner)
    engine.runner.native = kernel
    return engine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gives_the_torch_attention_reading_only_each_rows_keys(
        kernel: native_attention.NativeAttention, dtype: torch.dtype) -> None:
    runner = TransformerRunner(tiny_llama(dtype))
    lengths = [5, 17, 40]
    runner.cache.ensure_capacity(len(lengths), 64)
    for i in range(len(lengths)):
        runner.cache.allocate(f"r{i}")
    runner.prefill([PrefillChunk(i, 0, prompt(n, i), False) for i, n in enumerate(lengths)])
    gen = torch.Generator().manual_seed(0)
    b, heads, kv, dim = len(lengths), runner.num_heads, runner.num_kv_heads, runner.head_dim
    q = torch.randn(b, heads, dim, generator=gen).to(dtype)
    k = torch.randn(b, kv, dim, generator=gen).to(dtype)
    v = torch.randn(b, kv, dim, generator=gen).to(dtype)
    pos = torch.tensor(lengths)
    expected = runner._decode_attention(0, q, k, v, runner._decode_index(pos))
    # past each row's new token the buffer holds NaN: the torch path would be poisoned,
    # a kernel that reads only keys [0, pos] is not
    keys, values = runner.cache.keys[0], runner.cache.values[0]
    for row, n in enumerate(lengths):
        keys[row, :, n + 1:] = float("nan")
        values[row, :, n + 1:] = float("nan")
    runner.native = kernel
    got = runner._decode_attention(0, q, k, v, runner._decode_index(pos))
    assert got.dtype == dtype and got.shape == expected.shape
    assert not got.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def test_greedy_tokens_match_the_torch_attention_in_float32(
        kernel: native_attention.NativeAttention) -> None:
    model = tiny_llama(torch.float32)
    assert four_requests_tokens(_native_engine(model, kernel)) == four_requests_tokens(
        tiny_engine(model))


def test_a_requests_tokens_do_not_depend_on_its_batch_in_bfloat16(
        kernel: native_attention.NativeAttention) -> None:
    model = tiny_llama(torch.bfloat16)
    alone, in_batch = alone_and_in_a_batch(lambda: _native_engine(model, kernel))
    assert in_batch == alone


def test_speculative_verification_attends_as_decode_does(
        kernel: native_attention.NativeAttention) -> None:
    """bf16: verified tokens equal decoded ones only if the verification queries go through
    the same kernel as decode queries (the torch chunk path rounds otherwise)."""
    model = tiny_llama(torch.bfloat16)
    spec = SpeculativeConfig("ngram", num_tokens=4, ngram_max=3, ngram_min=1, max_rows=64)
    for offset in (0, 1):
        ids = prompt(30, offset)
        plain = _native_engine(model, kernel)
        plain.add_request(EngineRequest("a", ids, greedy(48)))
        expected = tokens(run_all(plain)["a"])
        fast = _native_engine(model, kernel, speculative=spec)
        fast.add_request(EngineRequest("a", ids, greedy(48)))
        assert tokens(run_all(fast)["a"]) == expected
        assert fast.stats().spec_accepted > 0


def test_attach_falls_back_to_torch_with_a_warning(caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    runner = TransformerRunner(tiny_llama(torch.float32))
    assert native_attention.attach(runner, "torch") is False and runner.native is None

    def no_compiler(cache_dir: Path | None = None) -> native_attention.NativeAttention:
        raise native_attention.NativeAttentionError("no C compiler (cc or gcc) on PATH")

    monkeypatch.setattr(native_attention, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="worker.engine.native_attention"):
        assert native_attention.attach(runner, "native") is False
    assert runner.native is None and "no C compiler" in caplog.text
    assert native_attention.NativeAttention.supports(
        torch.float16, torch.device("cpu"), 4, 2, 16) is not None
    assert "head_dim 24" in (native_attention.NativeAttention.supports(
        torch.float32, torch.device("cpu"), 4, 2, 24) or "")


def test_a_missing_compiler_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native_attention.NativeAttentionError, match="no-such-cc"):
        native_attention.build(tmp_path / "cache")


def test_a_verification_chunk_gives_the_decode_logits_bitwise(
        kernel: native_attention.NativeAttention) -> None:
    """A verified position's logits are the ones decoding it gives (bf16, bitwise): the
    verification queries attend through the same kernel as decode queries."""
    model = _wide_heads_llama()
    ids = prompt(120)

    def fresh() -> TransformerRunner:
        runner = TransformerRunner(model)
        runner.native = kernel
        runner.cache.ensure_capacity(1, 160)
        runner.cache.allocate("a")
        runner.prefill([PrefillChunk(0, 0, ids, False)])
        runner.cache.advance("a", len(ids))
        return runner

    decoded = fresh()
    first = decoded.decode([40], [len(ids)])
    decoded.cache.advance("a", 1)
    second = decoded.decode([41], [len(ids) + 1])
    verified = fresh().prefill([PrefillChunk(0, len(ids), [40, 41], True, 2, verify=True)])
    assert torch.equal(verified[0], first[0]) and torch.equal(verified[1], second[0])


def test_attach_does_not_refuse_a_compiled_step(kernel: native_attention.NativeAttention,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """TOKENFLEET_COMPILE no longer excludes the kernel: the compiled layer attends through
    it (``tokenfleet::native_attention``; tests/unit/test_compiled_step.py)."""
    runner = TransformerRunner(tiny_llama(torch.float32))
    with caplog.at_level(logging.WARNING, logger="worker.engine.native_attention"):
        assert native_attention.attach(runner, "native") is True
    assert runner.native is not None and not caplog.text


def test_the_custom_op_is_the_kernel(kernel: native_attention.NativeAttention) -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 16, generator=gen)
    keys, values = (torch.randn(5, 2, 32, 16, generator=gen) for _ in range(2))
    rows, lens = torch.tensor([4, 0, 2]), torch.tensor([1, 32, 9])
    out = torch.ops.tokenfleet.native_attention(q, keys, values, rows, lens, 0.25)
    assert torch.equal(out, kernel.attend(q, keys, values, rows, lens, 0.25))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("kv", "group", "dim"), [(3, 3, 64), (2, 4, 32)])
def test_the_kernel_at_smollm2s_heads_and_others_is_softmax_attention(
        kernel: native_attention.NativeAttention, dtype: torch.dtype, tol: float,
        kv: int, group: int, dim: int) -> None:
    """Three KV heads of three query heads of 64 (SmolLM2's shape: the kernel's path with
    the loops unrolled and the accumulators in registers) and a generic shape, against
    softmax attention in float64; keys past a row's length are NaN and must not be read.
    Lengths cover whole vectors of the exp and tails of it (1, 15, 16, 17, 40)."""
    gen = torch.Generator().manual_seed(3)
    lengths = [1, 15, 16, 17, 40]
    cap = 48
    q = torch.randn(len(lengths), kv * group, dim, generator=gen).to(dtype)
    keys = torch.randn(len(lengths), kv, cap, dim, generator=gen).to(dtype)
    values = torch.randn(len(lengths), kv, cap, dim, generator=gen).to(dtype)
    expected = torch.empty(len(lengths), kv * group, dim, dtype=torch.float64)
    for r, n in enumerate(lengths):
        for h in range(kv):
            qh = q[r, h * group:(h + 1) * group].double()
            scores = qh @ keys[r, h, :n].double().T / dim ** 0.5
            expected[r, h * group:(h + 1) * group] = scores.softmax(-1) @ values[r, h, :n].double()
        keys[r, :, n:] = float("nan")
        values[r, :, n:] = float("nan")
    got = kernel.attend(q, keys, values, torch.arange(len(lengths)), torch.tensor(lengths),
                        dim ** -0.5)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double().view_as(expected), expected, atol=tol, rtol=tol)
