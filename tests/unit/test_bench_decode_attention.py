"""bench.decode_attention: its 'buffer' variant is the runner's decode attention, and every
alternative it times computes the same attention (so its timings compare like with like)."""

from __future__ import annotations

import pytest
import torch

from bench.decode_attention import make_batch, variants
from tests.unit.tiny_model import tiny_llama
from worker.engine.model_runner import TransformerRunner


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buffer_variant_is_the_runners_decode_attention(dtype: torch.dtype) -> None:
    runner = TransformerRunner(tiny_llama(dtype))  # 2 KV heads, group 2, head_dim 16
    b = make_batch(5, 64, 1, kv=runner.num_kv_heads, group=runner.group,
                   dim=runner.head_dim, dtype=dtype)
    for i in range(5):
        runner.cache.allocate(f"s{i}")
    runner.cache.ensure_capacity(5, 64)
    assert runner.cache.len_cap == 64
    cache_k, cache_v = runner.cache.keys[0], runner.cache.values[0]
    cache_k[:5], cache_v[:5] = b.keys[0], b.values[0]
    pos = b.lengths - 1
    rows = torch.arange(5)
    k, v = b.keys[0][rows, :, pos].clone(), b.values[0][rows, :, pos].clone()  # rewrites
    ours = runner._decode_attention(0, b.q, k, v, runner._decode_index(pos))
    assert torch.equal(variants(b)["buffer (kept)"](b, 0), ours)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_every_variant_computes_the_same_attention(dtype: torch.dtype, tol: float) -> None:
    b = make_batch(9, 96, 2, dtype=dtype, seed=3)
    assert int(b.lengths.min()) < int(b.lengths.max())  # mixed lengths: the groups differ
    chosen = variants(b)
    for i in range(2):
        q = b.q.double().view(9, 3, 3, 64)
        scores = q @ b.keys[i].double().transpose(2, 3) / 8.0  # [B, kv, group, cap]
        hidden = torch.arange(96).view(1, 1, 1, 96) >= b.lengths.view(9, 1, 1, 1)
        probs = torch.softmax(scores.masked_fill(hidden, -torch.inf), -1)
        exact = (probs @ b.values[i].double()).reshape(9, -1)
        for name, fn in chosen.items():
            got = fn(b, i).double()
            assert got.shape == exact.shape, name
            assert (got - exact).abs().max().item() < tol, name
    # claimed bitwise: the buffer's math with fewer passes over the scores
    assert torch.equal(chosen["fused score passes"](b, 0), chosen["buffer (kept)"](b, 0))
