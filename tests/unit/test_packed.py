"""oneDNN-packed weights (worker/engine/packed.py): used only where bitwise equal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.unit.tiny_model import VOCAB, tiny_llama
from worker.engine.model_runner import PrefillChunk, TransformerRunner
from worker.engine.packed import can_pack, pack_linear

needs_packing = pytest.mark.skipif(
    not can_pack(torch.zeros(1, 1, dtype=torch.bfloat16))
    or pack_linear(torch.randn(96, 64).to(torch.bfloat16)) is None,
    reason="no oneDNN bf16 weight packing bitwise equal to F.linear on this machine (an "
           "AVX2-only CPU emulates bf16, and pack_linear rightly refuses there)",
)


needs_fp32_packing = pytest.mark.skipif(
    not can_pack(torch.zeros(1, 1)), reason="no oneDNN fp32 weight packing on this machine")


@needs_fp32_packing
def test_fp32_packed_rows_do_not_depend_on_the_row_count() -> None:
    """fp32 is packed for batch invariance (a row's result at any row count), which MKL's
    F.linear lacks below 4 rows; it stays within rounding of F.linear."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(96, 64, generator=gen)
    bias = torch.randn(96, generator=gen)
    x = torch.randn(70, 64, generator=gen)
    for b in (None, bias):
        linear = pack_linear(weight, b)
        assert linear is not None
        full = linear(x)
        torch.testing.assert_close(full, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
        for rows in (1, 2, 3, 4, 5, 17, 64):
            assert torch.equal(linear(x[:rows]), full[:rows])


@needs_fp32_packing
def test_fp32_runner_packed_and_plain_agree_within_rounding() -> None:
    model = tiny_llama(torch.float32)
    packed = TransformerRunner(model)
    assert packed.lm_head_packed is not None and packed.fused[0].qkv_packed is not None
    plain = TransformerRunner(model, pack_weights=False)
    first_packed, first_plain = _logits(packed)[0], _logits(plain)[0]
    torch.testing.assert_close(first_packed, first_plain, rtol=1e-4, atol=1e-4)


@needs_packing
def test_packed_linear_equals_f_linear_bitwise_at_every_row_count() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(96, generator=gen).to(torch.bfloat16)
    x = torch.randn(70, 64, generator=gen).to(torch.bfloat16)
    for b in (None, bias):
        linear = pack_linear(weight, b)
        assert linear is not None
        for rows in (1, 2, 3, 4, 5, 17, 64, 70):
            assert torch.equal(linear(x[:rows]), F.linear(x[:rows], weight, b))


def _logits(runner: TransformerRunner) -> list[torch.Tensor]:
    prompts = [[5, 9, 11, 3, 40, 41], [7, 8], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
    for i in range(len(prompts)):
        runner.cache.allocate(f"s{i}")
    runner.cache.ensure_capacity(len(prompts), 32)
    out = [runner.prefill([PrefillChunk(i, 0, p, True) for i, p in enumerate(prompts)])]
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        runner.cache.advance(f"s{i}", n)
    tokens = out[0].argmax(-1).tolist()
    for _ in range(4):
        out.append(runner.decode(tokens, lengths))
        for i in range(len(prompts)):
            runner.cache.advance(f"s{i}", 1)
        lengths = [n + 1 for n in lengths]
        tokens = out[-1].argmax(-1).tolist()
    return out


@needs_packing
def test_bf16_runner_logits_are_bitwise_the_same_packed_and_plain() -> None:
    model = tiny_llama(torch.bfloat16)
    packed = TransformerRunner(model)
    assert packed.lm_head_packed is not None
    assert all(
        f is not None and f.qkv_packed is not None and f.down_packed is not None
        for f in packed.fused
    )
    plain = TransformerRunner(model, pack_weights=False)
    assert plain.lm_head_packed is None
    for a, b in zip(_logits(packed), _logits(plain), strict=True):
        assert a.shape[-1] == VOCAB
        assert torch.equal(a, b)
