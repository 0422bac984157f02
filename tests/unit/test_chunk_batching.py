"""A step's prefill chunks attend as padded batches: bitwise what per-chunk attention gives
(logits and the keys/values left in the cache), whatever the mix of lengths, offsets and
rows; in bf16 also bitwise what each chunk gives prefilled alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine import model_runner
from worker.engine.kv_cache import RowKVCache
from worker.engine.model_runner import PrefillChunk, TransformerRunner, _group_chunks


def _model(dtype: torch.dtype) -> LlamaForCausalLM:
    """tiny_llama with head_dim 64 and 3 query heads per KV head (SmolLM2's): at head_dim 16
    fp32 (MKL) rounds products over 2-6 keys by the number of query rows, which per-chunk
    attention meets as well whenever a chunk's keys end just past a 128-key block."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=384, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


# (cached tokens before the chunk, chunk length): a burst of short tails after a hit, a
# cold prompt, one-token remainders, a chunk over the fp32 128-key block edge, a long one
MIXES = [
    [(40, 10), (40, 12), (40, 3), (40, 1), (40, 9), (40, 16)],
    [(0, 20), (120, 7), (130, 1), (2, 2), (64, 30), (127, 3)],
    [(0, 150), (40, 5), (40, 6), (200, 1), (0, 1)],
]


def _prefill(runner: TransformerRunner, mix: list[tuple[int, int]], prompts: list[list[int]],
             together: bool, decode: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill ``mix`` (after its cached parts) in one step, or one chunk a step; with
    ``decode``, row 0 decodes in the same step. Logits and the rows' keys and values."""
    runner.cache = RowKVCache(runner.cache.shape)
    rows = len(mix) + (1 if decode else 0)
    for r in range(rows):
        runner.cache.allocate(f"r{r}")
    runner.cache.ensure_capacity(rows, max(s + n for s, n in mix) + 8)
    base = 1 if decode else 0
    if decode:
        runner.prefill([PrefillChunk(0, 0, prompts[0][:6], False)])
    for i, (start, _) in enumerate(mix):
        if start:
            runner.prefill([PrefillChunk(base + i, 0, prompts[i][:start], False)])
    chunks = [PrefillChunk(base + i, s, prompts[i][s:s + n], True)
              for i, (s, n) in enumerate(mix)]
    if together:
        logits = (runner.decode_and_prefill([prompts[0][6]], [6], chunks) if decode
                  else runner.prefill(chunks))
    else:
        parts = [runner.decode([prompts[0][6]], [6])] if decode else []
        logits = torch.cat(parts + [runner.prefill([c]) for c in chunks])
    kept = [t[:rows].clone() for t in runner.cache.keys + runner.cache.values]
    return logits, kept


def _each_alone(chunks: list[PrefillChunk], heads: int, group: int) -> list[list[int]]:
    return [[j] for j in range(len(chunks))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mix", MIXES, ids=["tails", "assorted", "one-long"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "mixed"])
def test_batched_chunks_equal_per_chunk_attention(dtype: torch.dtype,
                                                  mix: list[tuple[int, int]], decode: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    runner = TransformerRunner(_model(dtype))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (s + n + 8,), generator=gen).tolist() for s, n in mix]
    batched = _prefill(runner, mix, prompts, True, decode)
    with monkeypatch.context() as patch:
        patch.setattr(model_runner, "_group_chunks", _each_alone)
        per_chunk = _prefill(runner, mix, prompts, True, decode)
    # fp32 matmuls round a row by its place among the step's rows (model_runner), so only
    # bf16 also equals one chunk per step
    references = [per_chunk]
    if dtype == torch.bfloat16:
        references.append(_prefill(runner, mix, prompts, False, decode))
    for logits, cache in references:
        assert torch.equal(batched[0], logits)
        for a, b in zip(batched[1], cache, strict=True):
            assert torch.equal(a, b)


def test_grouping_batches_short_chunks_and_leaves_a_long_one_alone() -> None:
    def chunks(mix: list[tuple[int, int]]) -> list[PrefillChunk]:
        return [PrefillChunk(i, s, [5] * n, True) for i, (s, n) in enumerate(mix)]

    assert _group_chunks(chunks(MIXES[0]), heads=4, group=2) == [[0, 1, 2, 3, 4, 5]]
    # 150 tokens: padding the others to it would mostly add work; (0, 1) sees too few keys
    assert _group_chunks(chunks(MIXES[2]), heads=4, group=2) == [[0], [1, 2, 3], [4]]
    # SmolLM2's shapes: a wave of 30 tails after a 200-token hit, in batches whose scores
    # stay within the bound, every chunk once
    wave = chunks([(200, 10 + i % 8) for i in range(30)])
    batches = _group_chunks(wave, heads=9, group=3)
    assert 1 < len(batches) < 8
    assert sorted(j for b in batches for j in b) == list(range(30))
    for b in batches:
        width = max(len(wave[j].token_ids) for j in b)
        span = max(wave[j].start + len(wave[j].token_ids) for j in b)
        assert len(b) * width * span * 9 <= model_runner._MAX_BATCH_SCORES
