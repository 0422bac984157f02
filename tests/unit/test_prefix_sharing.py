"""Prefix sharing between requests in flight: a burst sharing a prefix computes it once,
prompt blocks reach the cache chunk by chunk, a waiter whose leader goes away still
completes, eviction while requests wait or run, and a whole wave of hits sizes the KV cache
once. Greedy tokens are always those of a run without the cache."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from shared.protocol import SamplingParams
from tests.unit.test_prefix_cache import greedy, ids, tail
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine.engine import LLMEngine
from worker.engine.kv_cache import RowKVCache
from worker.engine.prefix_inflight import InflightBlocks, block_keys
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Sequence
from worker.engine.types import EngineRequest

SHARED = ids(64, 3)  # 4 full blocks of 16


def burst(count: int, tail_len: int = 8) -> list[tuple[str, list[int], int]]:
    return [(f"r{i}", SHARED + tail(tail_len, 100 + i), 6) for i in range(count)]


class Recorder:
    """Drives an engine step by step, keeping each request's tokens and each step's plan."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, str | None] = {}
        self.prefilled: list[int] = []  # prompt tokens prefilled per step
        self.admitted: list[list[str]] = []
        schedule = engine.scheduler.schedule

        def recording_schedule():  # type: ignore[no-untyped-def]
            plan = schedule()
            self.prefilled.append(sum(c.length for c in plan.prefills))
            self.admitted.append([s.id for s in plan.admitted])
            return plan

        engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]

    def add(self, requests: list[tuple[str, list[int], int]]) -> None:
        for rid, prompt, n in requests:
            self.engine.add_request(EngineRequest(rid, prompt, greedy(n)))

    def step(self) -> None:
        for out in self.engine.step():
            self.tokens.setdefault(out.id, []).extend(out.new_token_ids)
            if out.finished:
                self.finish[out.id] = out.finish_reason

    def drain(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.engine.has_unfinished():
                return
            self.step()
        raise AssertionError("the engine did not drain: a request waits forever")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_llama(request.param, max_positions=1024)


def cold(model: torch.nn.Module,
         requests: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
    rec = Recorder(tiny_engine(model))  # no prefix cache
    for request in requests:
        rec.add([request])
        rec.drain()
    return rec.tokens


@pytest.mark.parametrize("policy", ["mixed", "phase"])
def test_a_burst_sharing_a_prefix_computes_it_once(model: torch.nn.Module, policy: str) -> None:
    requests = burst(6)
    rec = Recorder(tiny_engine(model, prefix_cache_tokens=1024, scheduling=policy))
    rec.add(requests)
    rec.drain()
    # the leader prefills everything; each follower only its own 8 tokens
    assert sum(rec.prefilled) == len(SHARED) + 6 * 8
    assert rec.admitted[0] == ["r0"]  # the others waited for the leader's blocks
    assert sorted(n for names in rec.admitted[1:] for n in names) == [f"r{i}" for i in range(1, 6)]
    stats = rec.engine.stats()
    assert stats.prefix_cache_hits == 5 and stats.prefix_cache_hit_tokens == 5 * len(SHARED)
    assert rec.tokens == cold(model, requests)


def test_without_the_cache_a_burst_is_admitted_at_once(model: torch.nn.Module) -> None:
    rec = Recorder(tiny_engine(model, prefix_cache_tokens=0))
    rec.add(burst(4))
    rec.drain()
    assert rec.admitted[0] == ["r0", "r1", "r2", "r3"]
    assert sum(rec.prefilled) == 4 * (len(SHARED) + 8)


def test_blocks_reach_the_cache_as_each_chunk_is_computed(model: torch.nn.Module) -> None:
    engine = tiny_engine(model, prefix_cache_tokens=1024, max_prefill_tokens=24)
    rec = Recorder(engine)
    rec.add(burst(1, tail_len=40))  # 104 tokens: 5 chunks
    rec.step()
    assert engine.prefix is not None and "r0" in engine.seqs
    assert engine.prefix.num_tokens == 16  # the first chunk's full block
    rec.step()
    assert engine.prefix.num_tokens == 48  # 48 tokens computed: 3 blocks
    rec.drain()
    assert engine.prefix.num_tokens == 96


def test_a_follower_stops_waiting_once_the_shared_blocks_are_cached(
        model: torch.nn.Module) -> None:
    """A long leader prompt: a follower waits for the shared part, not for the whole prompt
    (it is admitted once the prefill budget has room)."""
    leader = ("lead", SHARED + tail(64, 9), 4)
    follower = ("follow", SHARED + tail(8, 10), 4)
    engine = tiny_engine(model, prefix_cache_tokens=1024, max_prefill_tokens=32)
    rec = Recorder(engine)
    rec.add([leader, follower])
    waiting = engine.scheduler.waiting
    rec.step()  # the leader's tokens 0..32: 2 of the 4 shared blocks cached
    assert [s.id for s in waiting] == ["follow"] and engine._should_wait(waiting[0])
    rec.step()  # 0..64: the shared blocks are all cached
    assert engine.seqs["lead"].is_prefilling and not engine._should_wait(waiting[0])
    rec.drain()
    assert sum(rec.prefilled) == len(leader[1]) + 8
    assert rec.tokens == cold(model, [leader, follower])


@pytest.mark.parametrize("policy", ["mixed", "phase"])
def test_waiters_complete_when_their_leader_is_cancelled(model: torch.nn.Module,
                                                         policy: str) -> None:
    requests = burst(4)
    engine = tiny_engine(model, prefix_cache_tokens=1024, max_prefill_tokens=16,
                         scheduling=policy)
    rec = Recorder(engine)
    rec.add(requests)
    rec.step()  # the leader's first 16 tokens; the rest wait for its blocks
    assert [s.id for s in engine.scheduler.running] == ["r0"]
    engine.abort_request("r0")
    rec.drain()
    assert rec.finish["r0"] == "cancelled"
    expected = cold(model, requests[1:])
    assert {k: rec.tokens[k] for k in expected} == expected
    assert all(rec.finish[f"r{i}"] == "length" for i in range(1, 4))
    assert not engine.inflight  # nothing left registered


def test_waiters_complete_when_their_leader_fails(model: torch.nn.Module,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    requests = burst(3)
    engine = tiny_engine(model, prefix_cache_tokens=1024, max_prefill_tokens=16)
    rec = Recorder(engine)
    rec.add(requests)
    prefill = engine.runner.prefill

    def failing_for_the_leader(chunks):  # type: ignore[no-untyped-def]
        if any(c.row == engine.cache.row_of("r0") for c in chunks if "r0" in engine.cache):
            raise RuntimeError("boom")
        return prefill(chunks)

    monkeypatch.setattr(engine.runner, "prefill", failing_for_the_leader)
    rec.drain()
    assert rec.finish["r0"] == "error"
    expected = cold(model, requests[1:])
    assert {k: rec.tokens[k] for k in expected} == expected


def test_eviction_while_requests_wait_and_run(model: torch.nn.Module) -> None:
    """A 4-block pool: an unrelated prompt evicts the shared blocks while followers wait
    for them and while others still run on copies of them."""
    requests = [*burst(3), ("other", tail(80, 11), 4), *burst(6)[3:]]
    engine = tiny_engine(model, prefix_cache_tokens=64, max_prefill_tokens=32)
    rec = Recorder(engine)
    rec.add(requests[:3])
    rec.step()
    rec.step()
    rec.add(requests[3:])
    rec.drain()
    assert rec.tokens == cold(model, requests)
    assert engine.prefix is not None and engine.prefix.num_tokens <= 64


def _first_request_cached(model: torch.nn.Module,
                          requests: list[tuple[str, list[int], int]],
                          ) -> tuple[LLMEngine, Recorder]:
    """An engine whose prefix cache holds the first of ``requests`` (run to its end)."""
    engine = tiny_engine(model, prefix_cache_tokens=1024)
    rec = Recorder(engine)
    rec.add(requests[:1])
    rec.drain()
    assert engine.prefix is not None
    return engine, rec


def test_a_hit_that_cannot_be_copied_is_prefilled(model: torch.nn.Module,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    requests = burst(3)
    engine, rec = _first_request_cached(model, requests)
    calls: list[str] = []

    def broken(name: str) -> Callable[..., None]:
        def fail(*args: object) -> None:
            calls.append(name)
            raise RuntimeError("no memory for the copy")
        return fail

    monkeypatch.setattr(engine.prefix, "load_many", broken("load_many"))
    monkeypatch.setattr(engine.prefix, "load", broken("load"))
    rec.add(requests[1:])
    rec.drain()
    assert calls == ["load_many", "load", "load"]  # the step's two hits, then each alone
    assert rec.tokens == cold(model, requests)


def test_a_wave_of_hits_is_copied_in_one_pass_exactly(model: torch.nn.Module,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    requests = burst(6)
    engine, rec = _first_request_cached(model, requests)
    calls: list[int] = []
    load_many = engine.prefix.load_many

    def counting(cache: RowKVCache, hits: list[tuple[int, int, list[int]]]) -> None:
        calls.append(len(hits))
        load_many(cache, hits)

    monkeypatch.setattr(engine.prefix, "load_many", counting)
    monkeypatch.setattr(engine.prefix, "load", None)  # never called one by one
    rec.add(requests[1:])
    rec.drain()
    assert calls == [5]
    assert rec.tokens == cold(model, requests)


def test_a_failed_step_prefills_the_hits_it_had_not_copied(
        model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The isolated retry of a failed step must not copy blocks that the participants run
    before it may have evicted: their hits are prefilled instead."""
    requests = burst(3)
    engine = tiny_engine(model, prefix_cache_tokens=1024)
    rec = Recorder(engine)
    rec.add(requests[:1])
    rec.drain()
    ensure = engine.cache.ensure_capacity
    calls = {"n": 0}

    def fails_once(rows: int, length: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        ensure(rows, length)

    monkeypatch.setattr(engine.cache, "ensure_capacity", fails_once)
    rec.add(requests[1:])
    rec.step()
    assert sum(rec.prefilled[-1:]) == 2 * 8  # planned as hits...
    rec.drain()
    assert rec.tokens == cold(model, requests)  # ...and prefilled whole, exactly


def test_a_wave_of_hits_sizes_the_cache_once(model: torch.nn.Module,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tiny_engine(model, prefix_cache_tokens=1024)
    rec = Recorder(engine)
    rec.add(burst(1))
    rec.drain()
    grown: list[tuple[int, int]] = []
    reallocate = RowKVCache._reallocate

    def counting(cache: RowKVCache, rows: int, length: int) -> None:
        grown.append((rows, length))
        reallocate(cache, rows, length)

    monkeypatch.setattr(RowKVCache, "_reallocate", counting)
    rec.add(burst(24)[1:])
    rec.step()
    assert len(rec.admitted[-1]) == 23
    assert len(grown) == 1


# --- the parts, without a model -----------------------------------------------------------
def test_inflight_blocks_count_rows_and_forget_them() -> None:
    prompt = list(range(3, 3 + 50))  # 3 full blocks of 16
    blocks = InflightBlocks(16)
    assert blocks.ahead(prompt, 0) == 0
    blocks.start("a", prompt, 0)
    blocks.start("b", prompt[:40], 16)  # its first block was cached: 1 block in flight
    assert blocks.ahead(prompt, 0) == 3
    assert blocks.ahead(prompt, 20) == 2  # from the block holding token 20
    assert blocks.ahead([*prompt[:16], 0, *prompt[17:]], 0) == 1  # differs in block 2
    blocks.done("a")
    assert blocks.ahead(prompt, 0) == 0  # block 0 is not in flight any more
    assert blocks.ahead(prompt, 16) == 1  # b's
    blocks.done("b")
    assert not blocks
    assert block_keys(prompt, 16) == block_keys([*prompt, 1, 2], 16)


def test_a_held_sequence_keeps_its_place_and_does_not_block_the_queue() -> None:
    held = {"b"}
    s = Scheduler(SchedulerConfig(max_prefill_tokens=1000, max_context=512),
                  should_wait=lambda seq: seq.id in held)
    for name in ("a", "b", "c"):
        s.add(Sequence(name, list(range(3, 13)), SamplingParams(max_tokens=4)))
    out = s.schedule()
    assert [q.id for q in out.admitted] == ["a", "c"]
    assert [q.id for q in s.waiting] == ["b"]
    held.clear()
    assert [q.id for q in s.schedule().admitted] == ["b"]


def test_a_held_sequence_does_not_let_a_later_one_jump_a_head_that_does_not_fit() -> None:
    def wait(seq: Sequence) -> bool:
        return seq.id == "a"

    s = Scheduler(SchedulerConfig(max_batch_size=1, max_prefill_tokens=1000, max_context=512),
                  should_wait=wait)
    s.running.append(Sequence("x", [3, 4], SamplingParams(max_tokens=4)))
    for name in ("a", "b", "c"):
        s.add(Sequence(name, list(range(3, 13)), SamplingParams(max_tokens=4)))
    s.schedule()
    assert [q.id for q in s.waiting] == ["a", "b", "c"]
