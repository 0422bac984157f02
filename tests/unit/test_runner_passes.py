"""A mixed step's one forward pass (decode rows + prefill chunks) gives bitwise the logits,
and leaves bitwise the cache, of a decode pass followed by a prefill pass."""

from __future__ import annotations

import pytest
import torch

from tests.unit.tiny_model import tiny_llama
from worker.engine.model_runner import PrefillChunk, TransformerRunner

RUNNING = [[5, 9, 11, 3, 40, 41], [7, 8], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
JOINING = [[12, 13, 14, 15, 16], [30, 31, 32, 33, 34, 35, 36, 37]]


def _start(runner: TransformerRunner) -> list[int]:
    """Prefill RUNNING into rows 0..2 and give JOINING rows 3..4; returns the next tokens."""
    for i in range(len(RUNNING) + len(JOINING)):
        runner.cache.allocate(f"s{i}")
    runner.cache.ensure_capacity(5, 48)
    logits = runner.prefill([PrefillChunk(i, 0, p, True) for i, p in enumerate(RUNNING)])
    for i, p in enumerate(RUNNING):
        runner.cache.advance(f"s{i}", len(p))
    return logits.argmax(-1).tolist()


def _joining_chunks() -> list[PrefillChunk]:
    # the second prompt arrives cut in two: a chunk that wants no logits, then the rest
    return [PrefillChunk(3, 0, JOINING[0], True), PrefillChunk(4, 0, JOINING[1][:5], False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_equals_decode_then_prefill(dtype: torch.dtype) -> None:
    model = tiny_llama(dtype)
    runs = []
    for fused in (False, True):
        runner = TransformerRunner(model)
        tokens = _start(runner)
        positions = [len(p) for p in RUNNING]
        if fused:
            logits = runner.decode_and_prefill(tokens, positions, _joining_chunks())
        else:
            logits = torch.cat(
                [runner.decode(tokens, positions), runner.prefill(_joining_chunks())]
            )
        assert logits.shape[0] == len(RUNNING) + 1
        for i in range(3):
            runner.cache.advance(f"s{i}", 1)
        runner.cache.advance("s3", len(JOINING[0]))
        runner.cache.advance("s4", 5)
        # the next step decodes all five rows: equal only if the cache was written equally
        tokens = [*logits.argmax(-1).tolist()[:4], JOINING[1][5]]
        following = runner.decode(tokens, [*[len(p) + 1 for p in RUNNING], len(JOINING[0]), 5])
        runs.append((logits, following))
    (a, a_next), (b, b_next) = runs
    assert torch.equal(a, b)
    assert torch.equal(a_next, b_next)


def test_fp32_with_every_matmul_packed_runs_a_mixed_step_in_one_pass() -> None:
    """Packed fp32 rows do not depend on the row count, so the one pass is used (and the
    test above holds bitwise for it); unpacked fp32 keeps the two passes."""
    model = tiny_llama(torch.float32)
    packed, plain = TransformerRunner(model), TransformerRunner(model, pack_weights=False)
    assert not plain.rows_invariant
    if not packed.rows_invariant:
        pytest.skip("no oneDNN fp32 weight packing on this machine")
    calls: list[int] = []
    embed = packed.embed.forward
    packed.embed.forward = lambda ids: calls.append(ids.shape[0]) or embed(ids)  # type: ignore[method-assign]
    tokens = _start(packed)
    calls.clear()
    packed.decode_and_prefill(tokens, [len(p) for p in RUNNING], _joining_chunks())
    assert calls == [len(RUNNING) + len(JOINING[0]) + 5]  # one pass over all the tokens


@pytest.mark.parametrize("native", [False, True])
def test_a_decode_step_writes_each_rows_key_and_value_at_its_position_only(
        native: bool) -> None:
    """``_decode_index``'s flat slots put row r's new key and value of every KV head at
    ``[r, :, pos[r]]`` of each layer's buffer (what ``keys[rows, :, pos] = k`` did), and
    touch nothing else; with the native kernel too (its lengths checked once a step)."""
    from worker.engine import native_attention

    runner = TransformerRunner(tiny_llama(torch.float32))
    if native:
        try:
            runner.native = native_attention.load()
        except native_attention.NativeAttentionError as exc:
            pytest.skip(str(exc))
    for i in range(3):
        runner.cache.allocate(f"s{i}")
    runner.cache.ensure_capacity(3, 16)
    before = [(k.clone(), v.clone()) for k, v in zip(runner.cache.keys, runner.cache.values,
                                                           strict=True)]
    pos = torch.tensor([4, 0, 9])
    gen = torch.Generator().manual_seed(1)
    kv, dim = runner.num_kv_heads, runner.head_dim
    k = torch.randn(3, kv, dim, generator=gen)
    v = torch.randn(3, kv, dim, generator=gen)
    q = torch.randn(3, runner.num_heads, dim, generator=gen)
    runner._decode_attention(1, q, k, v, runner._decode_index(pos))
    keys, values = runner.cache.keys[1], runner.cache.values[1]
    for r, p in enumerate(pos.tolist()):
        assert torch.equal(keys[r, :, p], k[r]) and torch.equal(values[r, :, p], v[r])
    written = torch.zeros_like(keys, dtype=torch.bool)
    written[torch.arange(3), :, pos] = True
    assert torch.equal(keys[~written], before[1][0][~written])
    assert torch.equal(values[~written], before[1][1][~written])
    for layer in (0,):  # the other layer untouched
        assert torch.equal(runner.cache.keys[layer], before[layer][0])
    if native:
        with pytest.raises(ValueError, match="key lengths"):
            cap = runner.cache.len_cap  # a row seeing cap + 1 keys: past the buffer
            runner._decode_index(torch.tensor([4, cap, 0]))


@pytest.mark.parametrize(("rows", "vocab"), [(1, 49152), (5, 1024), (3, 1000), (2, 512)])
def test_top_indices_are_the_k_largest_as_topk_finds_them(rows: int, vocab: int) -> None:
    from worker.engine.model_runner import _top_indices

    gen = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen)
    logits[0, 7] = logits[0, 900 % vocab] = 50.0  # two winners in different blocks
    logits[-1, vocab - 1] = 40.0  # one in the last block
    got = _top_indices(logits, 8)
    want = torch.topk(logits, 8, dim=-1).indices
    assert got.shape == (rows, 8)
    assert torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values)
