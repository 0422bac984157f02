"""KV-cache accounting: the documented memory bound, a reallocation that fails without
damage, and free slots that respect the KV budget."""

from __future__ import annotations

import collections
from collections.abc import Callable

import pytest
import torch

from shared.protocol import SamplingParams
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine.engine import LLMEngine
from worker.engine.kv_cache import CacheShape, RowKVCache
from worker.engine.types import EngineRequest


def _cache(**kw: int) -> RowKVCache:
    shape = CacheShape(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float32,
                       device=torch.device("cpu"))
    return RowKVCache(shape, **kw)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(torch.float32)


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _prompt(n: int, offset: int = 0) -> list[int]:
    return [1] + [3 + (5 * i + offset) % 90 for i in range(n - 1)]


def _run(engine: LLMEngine, each_step: Callable[[], None] = lambda: None,
         ) -> dict[str, list[int]]:
    got: dict[str, list[int]] = collections.defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            got[out.id].extend(out.new_token_ids)
        each_step()
    return dict(got)


def test_allocated_bytes_stay_within_the_documented_bound(model: torch.nn.Module) -> None:
    """docs/design/engine.md: the buffer never exceeds max_batch_tokens x bytes per token,
    whatever the row and length padding."""
    budget = 256
    engine = tiny_engine(model, max_batch_tokens=budget, max_prefill_tokens=64)
    bound = budget * engine.cache.shape.bytes_per_token
    for i, (n, max_tokens) in enumerate([(10, 200), (30, 40), (5, 60), (70, 30), (8, 100)]):
        engine.add_request(EngineRequest(f"r{i}", _prompt(n, i), _params(max_tokens)))
    peak = 0

    def check() -> None:
        nonlocal peak
        assert engine.cache.allocated_bytes <= bound
        peak = max(peak, engine.cache.allocated_bytes)

    got = _run(engine, check)
    assert len(got) == 5 and peak > 0


def test_padding_is_used_when_it_fits_the_budget() -> None:
    cache = _cache(token_budget=10_000)
    cache.allocate("a")
    cache.ensure_capacity(1, 10)
    assert (cache.rows_cap, cache.len_cap) == (4, 64)
    tight = _cache(token_budget=100)
    tight.allocate("a")
    tight.ensure_capacity(1, 70)
    assert tight.rows_cap == 1 and tight.len_cap >= 70 and tight.allocated_tokens <= 100


def _fill(cache: RowKVCache, names: str, length: int) -> None:
    for name in names:
        cache.allocate(name)
    cache.ensure_capacity(len(names), length)
    for i, name in enumerate(names):
        row = cache.row_of(name)
        for layer in range(cache.shape.num_layers):
            cache.keys[layer][row, :, :length] = 10.0 * layer + i
            cache.values[layer][row, :, :length] = -10.0 * layer - i
        cache.advance(name, length)


def _failing_zeros(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> list[int]:
    """``torch.zeros`` raises like an out-of-memory allocation on call number ``fail_at``."""
    real, calls = torch.zeros, [0]

    def zeros(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (simulated)")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "zeros", zeros)
    return calls


def test_a_failed_reallocation_leaves_the_old_cache_usable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache()
    _fill(cache, "abc", 5)
    before = ([k.clone() for k in cache.keys], [v.clone() for v in cache.values],
              cache.rows_cap, cache.len_cap)
    _failing_zeros(monkeypatch, fail_at=4)  # the fourth of six layer buffers
    with pytest.raises(RuntimeError, match="allocate"):
        cache.ensure_capacity(3, 200)
    monkeypatch.undo()
    assert (cache.rows_cap, cache.len_cap) == before[2:]
    for old, now in zip(before[0] + before[1], cache.keys + cache.values, strict=True):
        assert torch.equal(old, now)
    cache.free("a")  # still consistent: rows move with their data
    assert float(cache.keys[2][cache.row_of("c"), 0, 4, 0]) == 22.0
    cache.ensure_capacity(2, 200)  # and it can still grow, keeping the data
    assert cache.len_cap >= 200 and float(cache.values[1][cache.row_of("b"), 1, 0, 3]) == -11.0


def test_a_failed_shrink_keeps_the_bigger_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache()
    _fill(cache, "a", 3)
    cache.ensure_capacity(1, 1000)
    _failing_zeros(monkeypatch, fail_at=1)
    cache.ensure_capacity(1, 4)  # would shrink; the allocation fails; nothing breaks
    assert cache.len_cap >= 1000 and float(cache.keys[1][0, 0, 2, 0]) == 10.0


def test_capacity_never_cuts_a_row_longer_than_asked() -> None:
    cache = _cache()
    _fill(cache, "ab", 300)
    cache.ensure_capacity(2, 4)  # e.g. a step whose participants are all short
    assert cache.len_cap >= 300 and float(cache.keys[2][cache.row_of("b"), 0, 299, 0]) == 21.0


def test_the_engine_survives_a_failed_cache_growth(model: torch.nn.Module,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = {f"r{i}": _prompt(20 + 9 * i, i) for i in range(3)}
    reference = {}
    for rid, ids in prompts.items():
        alone = tiny_engine(model)
        alone.add_request(EngineRequest(rid, ids, _params(60)))
        reference[rid] = _run(alone)[rid]
    engine = tiny_engine(model)
    for rid, ids in prompts.items():
        engine.add_request(EngineRequest(rid, ids, _params(60)))
    got: dict[str, list[int]] = collections.defaultdict(list)

    def next_step_grows() -> bool:
        longest = max(s.num_cached for s in engine.seqs.values()) + 1
        return engine.cache.len_cap > 0 and longest > engine.cache.len_cap

    while not next_step_grows():
        for out in engine.step():
            got[out.id].extend(out.new_token_ids)
    # the next step must grow the cache: one of its allocations fails, mid-way
    _failing_zeros(monkeypatch, fail_at=3)
    for rid, tokens in _run(engine).items():
        got[rid].extend(tokens)
    assert dict(got) == reference


def _long(rid: str, engine: LLMEngine, prompt_len: int, max_tokens: int) -> None:
    engine.add_request(EngineRequest(rid, _prompt(prompt_len), _params(max_tokens)))


def test_free_slots_respect_the_kv_budget(model: torch.nn.Module) -> None:
    engine = tiny_engine(model, max_batch_size=64, max_waiting=16, max_batch_tokens=1000)
    assert engine.num_free_slots() == 80  # idle: a full batch plus the waiting allowance
    _long("a", engine, 50, 400)  # 450 tokens: only two such rows fit in 1000
    engine.step()
    assert engine.num_free_slots() == 2 + 2 - 1
    _long("b", engine, 50, 400)
    _long("c", engine, 50, 400)
    _long("d", engine, 50, 400)
    assert engine.num_free_slots() == 0
    short = tiny_engine(model, max_batch_size=64, max_waiting=16, max_batch_tokens=1000)
    _long("s", short, 5, 10)  # 15 tokens: the batch size binds, not the budget
    assert short.num_free_slots() == 79


def test_a_batch_that_turns_over_whole_reuses_the_buffers_until_idle(
        model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tiny_engine(model)
    for i in range(4):
        engine.add_request(EngineRequest(f"a{i}", _prompt(12, i), _params(5)))
    first = _run(engine)
    keys = engine.cache.keys
    assert engine.cache.num_sequences == 0 and engine.cache.allocated_tokens > 0
    allocations: list[tuple[int, int]] = []
    reallocate = RowKVCache._reallocate
    monkeypatch.setattr(RowKVCache, "_reallocate", lambda self, rows, length: (
        allocations.append((rows, length)), reallocate(self, rows, length))[1])
    engine.add_request(EngineRequest("held", _prompt(12, 0), _params(5)))
    engine.release_idle_memory()  # a request is in: nothing goes
    for i in range(3):
        engine.add_request(EngineRequest(f"b{i}", _prompt(12, i + 1), _params(5)))
    again = _run(engine)
    assert engine.cache.keys is keys and allocations == []  # the same buffers
    assert [again[rid] for rid in ("held", "b0", "b1", "b2")] == [
        first[f"a{i}"] for i in range(4)]
    engine.release_idle_memory()
    assert engine.cache.allocated_tokens == 0 and engine.cache.keys == []
