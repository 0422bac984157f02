"""Automatic prefix caching: exact tokens with and without it, mid-block hits, eviction
while a user still runs, the pool's LRU, the scheduler's budgets and the reported counts."""

from __future__ import annotations

import itertools

import pytest
import torch

from shared.protocol import SamplingParams
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine.engine import LLMEngine
from worker.engine.kv_cache import CacheShape, RowKVCache
from worker.engine.model_runner import PrefillChunk, TransformerRunner
from worker.engine.prefix_cache import PrefixCache
from worker.engine.types import EngineRequest, EngineStats
from worker.heartbeat import WorkerStatus
from worker.metrics import WorkerMetrics


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, 96, (n - 1,), generator=gen).tolist()]


def tail(n: int, seed: int) -> list[int]:
    return ids(n + 1, seed)[1:]


SHARED = ids(40, 7)  # 2 full blocks of 16 and 8 tokens into the third


def run(engine: LLMEngine, requests: list[tuple[str, list[int], int]],
        steps_between: int = 0) -> dict[str, list[int]]:
    """Add the requests ``steps_between`` steps apart, then drain; tokens per request."""
    got: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            got.setdefault(out.id, []).extend(out.new_token_ids)

    for rid, prompt, n in requests:
        engine.add_request(EngineRequest(rid, prompt, greedy(n)))
        for _ in range(steps_between):
            step()
    while engine.has_unfinished():
        step()
    return got


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_llama(request.param, max_positions=1024)


def test_greedy_tokens_identical_with_and_without_the_cache(model: torch.nn.Module) -> None:
    requests = [("a", SHARED + tail(24, 1), 12), ("b", SHARED + tail(9, 2), 20),
                ("c", SHARED + tail(200, 3), 16), ("d", SHARED[:33], 8),
                ("e", SHARED + tail(24, 1), 12)]  # e: a's whole prompt (64 tokens) again
    cold = run(tiny_engine(model), requests, steps_between=3)
    engine = tiny_engine(model, prefix_cache_tokens=1024)
    warm = run(engine, requests, steps_between=3)
    assert warm == cold
    stats = engine.stats()
    assert (stats.prefix_cache_hits, stats.prefix_cache_misses) == (4, 1)
    # b, c: 40 shared (mid-block); d: 32 of 33; e: all but its last prompt token
    assert stats.prefix_cache_hit_tokens == 40 + 40 + 32 + 63


def test_a_hit_may_end_mid_block() -> None:
    shape = CacheShape(1, 1, 2, torch.float32, torch.device("cpu"))
    pool = PrefixCache(shape, 64, block_size=4)
    row = RowKVCache(shape)
    row.allocate("x")
    row.ensure_capacity(1, 12)
    for t in (row.keys[0], row.values[0]):
        t[0, 0, :12] = torch.arange(12, dtype=torch.float32).unsqueeze(1)
    prompt = list(range(10, 22))
    assert pool.insert(row, 0, prompt) == 3
    hit, slots = pool.match([*prompt[:6], 99, 98, 97])  # 1 block, then 2 of the next
    assert (hit, len(slots)) == (6, 2)
    row.allocate("y")
    pool.load(row, 1, hit, slots)
    assert torch.equal(row.keys[0][1, 0, :6], row.keys[0][0, 0, :6])
    assert pool.match(prompt)[0] == 11  # the whole prompt: its last token is left to prefill
    assert pool.match([5, 6, 7])[0] == 0


def test_prefix_evicted_while_a_request_that_used_it_runs(model: torch.nn.Module) -> None:
    user = ("user", SHARED + tail(12, 4), 24)
    cold = run(tiny_engine(model), [user])
    engine = tiny_engine(model, prefix_cache_tokens=64, prefix_block_size=16)  # 4 blocks
    run(engine, [("seed", SHARED + tail(8, 5), 2)])
    got: dict[str, list[int]] = {}
    engine.add_request(EngineRequest(*user[:2], greedy(user[2])))
    for _ in range(3):
        for out in engine.step():
            got.setdefault(out.id, []).extend(out.new_token_ids)
    assert engine.stats().prefix_cache_hit_tokens == 40
    assert engine.prefix is not None
    assert engine.prefix.peek(user[1]) > 0
    engine.add_request(EngineRequest("other", tail(80, 6), greedy(4)))  # 5 blocks: evicts all
    evicted_while_running = False
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.id, []).extend(out.new_token_ids)
        if engine.prefix.peek(user[1]) == 0 and "user" in engine.seqs:
            evicted_while_running = True
    assert evicted_while_running
    assert got["user"] == cold["user"]


def test_lru_evicts_the_tails_of_old_prefixes_first() -> None:
    shape = CacheShape(1, 1, 2, torch.float32, torch.device("cpu"))
    pool = PrefixCache(shape, 4 * 2, block_size=2)  # 4 blocks
    row = RowKVCache(shape)
    row.allocate("x")
    row.ensure_capacity(1, 8)
    old, new = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]
    assert pool.insert(row, 0, old) == 3
    assert pool.insert(row, 0, new) == 2  # needs 2 slots: evicts old's tail (5, 6) first
    assert pool.match([*old, 0])[0] == 4
    assert pool.match([*new, 0])[0] == 4
    assert pool.num_tokens == 8 <= pool.capacity_tokens
    pool.match([*old, 0])  # old is now the newest
    pool.insert(row, 0, [20, 21, 22])  # evicts new's tail
    assert (pool.match([*old, 0])[0], pool.match([*new, 0])[0]) == (4, 2)


def test_clearing_and_evicting_a_long_chain_frees_every_block() -> None:
    shape = CacheShape(1, 1, 2, torch.float32, torch.device("cpu"))
    pool = PrefixCache(shape, 3000 * 2, block_size=2)
    row = RowKVCache(shape)
    row.allocate("x")
    row.ensure_capacity(1, 6000)
    long_prompt = list(range(5000))  # 2,500 blocks deep: deeper than Python's recursion
    assert pool.insert(row, 0, long_prompt) == 2500
    pool.insert(row, 0, [7, 7, 7, 7])
    assert pool.match([*long_prompt, 1])[0] == 5000
    pool.clear()
    assert pool.num_tokens == 0 and pool.match([*long_prompt, 1])[0] == 0
    assert pool.insert(row, 0, long_prompt[:6000]) == 2500  # every slot is free again


def test_nothing_is_cached_with_a_zero_pool(model: torch.nn.Module) -> None:
    engine = tiny_engine(model, prefix_cache_tokens=0)
    run(engine, [("a", SHARED, 2), ("b", SHARED, 2)])
    assert engine.prefix is None
    assert engine.stats().prefix_cache_hits == 0


def test_a_hit_is_not_prefilled_again_nor_charged_to_the_prefill_budget(
        model: torch.nn.Module) -> None:
    engine = tiny_engine(model, prefix_cache_tokens=1024, max_prefill_tokens=16)
    run(engine, [("seed", SHARED + tail(8, 5), 1)])  # 3 blocks cached
    engine.add_request(EngineRequest("a", SHARED + tail(10, 8), greedy(2)))
    engine.add_request(EngineRequest("b", tail(30, 9), greedy(2)))
    plan = engine.scheduler.schedule()
    chunks = {c.seq.id: (c.start, c.length) for c in plan.prefills}
    assert chunks == {"a": (40, 10), "b": (0, 6)}  # a: 10 uncached tokens, b the rest
    assert engine.cache.num_tokens == 40


def test_prefill_does_not_depend_on_where_the_prompt_is_cut(model: torch.nn.Module) -> None:
    """The property a hit's exactness rests on: keys, values and logits of a prompt are
    bitwise the same whatever its chunks (here 0..n and 0..cut, cut..n)."""
    runner = TransformerRunner(model)
    prompt = ids(300, 11)

    def prefill(cuts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        runner.cache = RowKVCache(runner.cache.shape)
        runner.cache.allocate("x")
        runner.cache.ensure_capacity(1, len(prompt))
        bounds = [0, *cuts, len(prompt)]
        for start, end in itertools.pairwise(bounds):
            logits = runner.prefill([PrefillChunk(0, start, prompt[start:end],
                                                  end == len(prompt))])
        return logits, runner.cache.keys[-1][0, :, :len(prompt)].clone()

    whole_logits, whole_keys = prefill([])
    for cuts in ([208], [17, 160], [299]):
        logits, keys = prefill(cuts)
        assert torch.equal(logits, whole_logits), cuts
        assert torch.equal(keys, whole_keys), cuts


def test_counts_reach_the_heartbeat_and_the_metrics() -> None:
    stats = EngineStats(prefix_cache_hits=3, prefix_cache_misses=2, prefix_cache_hit_tokens=120,
                        prefix_cache_query_tokens=400, prefix_cache_tokens=64)
    status = WorkerStatus(worker_id="w", model="m")
    status.update(stats)
    mapping = status.to_mapping()
    assert (mapping["prefix_cache_hits"], mapping["prefix_cache_misses"],
            mapping["prefix_cache_hit_tokens"], mapping["prefix_cache_tokens"]) == (
        "3", "2", "120", "64")
    metrics = WorkerMetrics("m", "w")
    metrics.on_engine_stats(stats)
    metrics.on_engine_stats(EngineStats(prefix_cache_hits=4, prefix_cache_misses=2,
                                        prefix_cache_hit_tokens=150,
                                        prefix_cache_query_tokens=450, prefix_cache_tokens=80))
    value = metrics.registry.get_sample_value
    labels = {"model_name": "m"}
    assert value("tokenfleet:prefix_cache_hits_total", labels) == 150
    assert value("tokenfleet:prefix_cache_queries_total", labels) == 450
    assert value("tokenfleet:prefix_cache_requests_total", {**labels, "outcome": "hit"}) == 4
    assert value("tokenfleet:prefix_cache_requests_total", {**labels, "outcome": "miss"}) == 2
    assert value("tokenfleet:prefix_cache_tokens", labels) == 80


@pytest.mark.parametrize("len_align", [16, 7], ids=["whole-blocks", "token-fallback"])
def test_loading_many_hits_at_once_equals_loading_each(len_align: int) -> None:
    shape = CacheShape(2, 2, 3, torch.float32, torch.device("cpu"))
    pool = PrefixCache(shape, 64, block_size=4)
    src = RowKVCache(shape)
    src.allocate("x")
    src.ensure_capacity(1, 16)
    for t in src.keys + src.values:
        t.normal_()
    prompt = list(range(10, 24))  # 14 tokens: 3 full blocks of 4
    pool.insert(src, 0, prompt)
    hits = [pool.match([*prompt[:n], 99, 98]) for n in (6, 12, 9)]  # mid-block, whole, mid
    caches = []
    for together in (True, False):
        rows = RowKVCache(shape, len_align=len_align)
        for i in range(3):
            rows.allocate(f"r{i}")
        rows.ensure_capacity(3, 14)
        loads = [(i, hit, slots) for i, (hit, slots) in enumerate(hits)]
        if together:
            pool.load_many(rows, loads)
        else:
            for load in loads:
                pool.load(rows, *load)
        caches.append(rows)
    for (hit, _), i in zip(hits, range(3), strict=True):
        assert hit == (6, 12, 9)[i]
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values,
                        strict=True):
            assert torch.equal(a[i, :, :hit], b[i, :, :hit])
    for a, s in zip(caches[0].keys + caches[0].values, src.keys + src.values, strict=True):
        assert torch.equal(a[1, :, :12], s[0, :, :12])  # the pool's copy of the prompt
