"""Scheduler policy and KV-cache bookkeeping, with no model."""

from __future__ import annotations

import pytest
import torch

from shared.protocol import SamplingParams
from worker.engine.kv_cache import CacheShape, RowKVCache
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Sequence


def seq(name: str, prompt_len: int, max_tokens: int = 16) -> Sequence:
    return Sequence(name, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens))


def finish_prefill(out_chunks: list, scheduler: Scheduler) -> None:  # type: ignore[type-arg]
    for chunk in out_chunks:
        chunk.seq.num_cached += chunk.length


def test_admission_respects_max_batch_size() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_batch_tokens=10_000,
                                  max_prefill_tokens=1000, max_context=512))
    for i in range(5):
        s.add(seq(f"s{i}", 10))
    out = s.schedule()
    assert [q.id for q in out.admitted] == ["s0", "s1", "s2"]
    assert len(s.waiting) == 2


def test_admission_respects_padded_token_budget() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=64, max_batch_tokens=300,
                                  max_prefill_tokens=1000, max_context=512))
    for i in range(4):
        s.add(seq(f"s{i}", 40, max_tokens=60))  # reservation 100 each
    out = s.schedule()
    assert len(out.admitted) == 3  # 3 rows x 100 <= 300 < 4 x 100
    assert s.reserved_tokens <= 300


def test_a_long_reservation_waits_at_the_head_until_it_fits() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=64, max_batch_tokens=400,
                                  max_prefill_tokens=1000, max_context=512))
    s.add(seq("short", 10, max_tokens=40))  # 50
    s.add(seq("long", 100, max_tokens=250))  # 350: 2 x 350 > 400
    s.add(seq("after", 10, max_tokens=10))
    out = s.schedule()
    assert [q.id for q in out.admitted] == ["short"]
    assert [q.id for q in s.waiting] == ["long", "after"]  # first come, first served
    s.remove(s.running[0])
    out = s.schedule()
    assert [q.id for q in out.admitted] == ["long"]


def test_long_prompt_is_chunked_and_decodes_keep_running() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_batch_tokens=10_000,
                                  max_prefill_tokens=64, max_context=1024))
    s.add(seq("decoder", 10))
    first = s.schedule()
    finish_prefill(first.prefills, s)
    s.add(seq("long", 200))
    lengths = []
    for _ in range(4):
        out = s.schedule()
        assert [q.id for q in out.decodes] == ["decoder"]  # never stalled by the prompt
        assert sum(c.length for c in out.prefills) <= 64
        lengths.append([(c.seq.id, c.start, c.length) for c in out.prefills])
        finish_prefill(out.prefills, s)
    assert lengths == [[("long", 0, 64)], [("long", 64, 64)], [("long", 128, 64)],
                       [("long", 192, 8)]]
    out = s.schedule()
    assert {q.id for q in out.decodes} == {"decoder", "long"} and not out.prefills


def test_rejects_a_request_larger_than_the_whole_budget() -> None:
    s = Scheduler(SchedulerConfig(max_batch_tokens=100, max_prefill_tokens=50,
                                  max_context=4096))
    try:
        s.add(seq("huge", 80, max_tokens=80))
    except ValueError as exc:
        assert "max_batch_tokens" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def _cache() -> RowKVCache:
    return RowKVCache(CacheShape(2, 1, 2, torch.float32, torch.device("cpu")), row_align=1,
                      len_align=4)


def _filled(names: str, budget: int | None = None) -> RowKVCache:
    """A cache whose sequence ``names[i]`` holds two tokens of value ``i + 1``."""
    cache = RowKVCache(CacheShape(2, 1, 2, torch.float32, torch.device("cpu")), row_align=1,
                       len_align=4, token_budget=budget)
    for name in names:
        cache.allocate(name)
    cache.ensure_capacity(len(names), 4)
    for i, name in enumerate(names):
        row = cache.row_of(name)
        for layer in range(2):
            cache.keys[layer][row, :, :2] = float(i + 1)
            cache.values[layer][row, :, :2] = -float(i + 1)
        cache.advance(name, 2)
    return cache


def _value(cache: RowKVCache, name: str) -> float:
    row = cache.row_of(name)
    assert float(cache.values[1][row, 0, 1, 0]) == -float(cache.keys[1][row, 0, 1, 0])
    return float(cache.keys[1][row, 0, 1, 0])


def test_a_freed_row_is_a_hole_the_next_sequence_takes_and_nothing_moves() -> None:
    cache = _filled("abcd")
    cache.free("b")
    assert cache.num_rows == 4 and cache.num_sequences == 3
    assert [cache.row_of(n) for n in "acd"] == [0, 2, 3]
    assert [_value(cache, n) for n in "acd"] == [1.0, 3.0, 4.0]
    assert cache.allocate("e") == 1 and cache.num_sequences == 4
    cache.free("d")  # a trailing hole is dropped
    assert cache.num_rows == 3 and cache.num_tokens == 4


def test_more_than_half_holes_compacts_and_data_moves_with_its_row() -> None:
    cache = _filled("abcde")
    for name in "abc":
        cache.free(name)
    assert cache.num_rows == cache.num_sequences == 2
    assert sorted(cache.row_of(n) for n in "de") == [0, 1]
    assert [_value(cache, n) for n in "de"] == [4.0, 5.0]


def test_gather_front_moves_only_the_rows_outside_the_front() -> None:
    cache = _filled("abcde")
    cache.free("b")
    moved: list[tuple[int, int]] = []
    swap = cache._swap_rows
    cache._swap_rows = lambda a, b: (moved.append((a, b)), swap(a, b))[1]  # type: ignore
    order = cache.gather_front(["e", "a", "c"])
    assert sorted(order) == ["a", "c", "e"] and moved == [(4, 1)]  # e into b's hole
    assert [cache.row_of(n) for n in order] == [0, 1, 2]
    assert [_value(cache, n) for n in "acde"] == [1.0, 3.0, 4.0, 5.0]
    order = cache.gather_front(["d", "c"])  # rows a, e, c, d: c and d swap in
    assert order == ["c", "d"] and moved[1:] == [(2, 0), (3, 1)]
    assert cache.gather_front(["d", "c"]) == ["c", "d"] and len(moved) == 3  # in place
    assert [_value(cache, n) for n in "acde"] == [1.0, 3.0, 4.0, 5.0]
    cache.move_to_front(["c", "e"])  # an order asked for is still honoured
    assert (cache.row_of("c"), cache.row_of("e")) == (0, 1)
    assert [_value(cache, n) for n in "acde"] == [1.0, 3.0, 4.0, 5.0]


def test_holes_are_compacted_before_the_buffer_outgrows_its_budget() -> None:
    cache = _filled("abcd", budget=16)  # 4 rows x 4 positions
    cache.free("a")
    cache.allocate("e")  # takes a's hole
    cache.free("b")
    cache.free("c")  # 2 holes of 4: not more than half
    assert cache.num_rows == 4
    cache.ensure_capacity(cache.num_rows, 8)  # 4 x 8 > 16: compact to 2 rows first
    assert cache.num_rows == 2 and cache.allocated_tokens <= 16
    assert _value(cache, "d") == 4.0 and sorted(cache.row_of(n) for n in "de") == [0, 1]

def test_cache_grows_and_shrinks_keeping_data_and_frees_when_empty() -> None:
    cache = _cache()
    cache.allocate("a")
    cache.ensure_capacity(1, 3)
    cache.keys[0][0, 0, :3] = 7.0
    cache.advance("a", 3)
    cache.ensure_capacity(1, 60)
    assert cache.len_cap == 60 and float(cache.keys[0][0, 0, 2, 0]) == 7.0
    cache.ensure_capacity(1, 4)
    assert cache.len_cap == 4 and float(cache.keys[0][0, 0, 2, 0]) == 7.0
    cache.free("a")  # empty: the buffers stay for the next batch until released
    assert cache.num_rows == 0 and cache.allocated_tokens == 4
    cache.allocate("b")
    with pytest.raises(RuntimeError, match="holding 1 rows"):
        cache.release()
    cache.free("b")
    cache.release()
    assert cache.allocated_tokens == 0 and cache.keys == []


def _phase(**overrides: int) -> Scheduler:
    config = dict(max_batch_size=8, max_batch_tokens=10_000, max_prefill_tokens=64,
                  max_context=1024)
    config.update(overrides)
    return Scheduler(SchedulerConfig(policy="phase", **config))


def test_phase_pauses_decodes_while_a_prompt_prefills_then_decodes_all_together() -> None:
    s = _phase()
    s.add(seq("decoder", 10))
    finish_prefill(s.schedule().prefills, s)
    s.add(seq("long", 200))
    shapes = []
    for _ in range(4):
        out = s.schedule()
        assert not out.decodes  # decode pauses for the whole prompt
        shapes.append([(c.seq.id, c.start, c.length) for c in out.prefills])
        finish_prefill(out.prefills, s)
    assert shapes == [[("long", 0, 64)], [("long", 64, 64)], [("long", 128, 64)],
                      [("long", 192, 8)]]
    out = s.schedule()
    assert [q.id for q in out.decodes] == ["decoder", "long"] and not out.prefills


def test_phase_bound_runs_a_decode_step_after_that_many_prefill_only_steps() -> None:
    s = _phase(phase_max_prefill_steps=2)
    s.add(seq("decoder", 10))
    finish_prefill(s.schedule().prefills, s)  # no decoder waits yet: not counted
    s.add(seq("long", 200))
    kinds = []
    for _ in range(6):
        out = s.schedule()
        assert not (out.decodes and out.prefills)  # still one phase per step
        kinds.append("D" if out.decodes else f"P{out.prefills[0].start}")
        finish_prefill(out.prefills, s)
    # two 64-token prefill passes, then the waiting stream gets a token, and so on
    assert kinds == ["P0", "P64", "D", "P128", "P192", "D"]
    out = s.schedule()
    assert [q.id for q in out.decodes] == ["decoder", "long"]


def test_phase_bound_does_not_delay_prefill_when_no_stream_waits() -> None:
    s = _phase(phase_max_prefill_steps=1)
    s.add(seq("long", 200))
    starts = []
    for _ in range(4):
        out = s.schedule()
        starts.append(out.prefills[0].start)
        finish_prefill(out.prefills, s)
    assert starts == [0, 64, 128, 192]


def test_phase_prefills_a_window_of_arrivals_in_one_step_and_they_decode_in_step() -> None:
    s = _phase(max_prefill_tokens=512)
    s.add(seq("old", 10))
    finish_prefill(s.schedule().prefills, s)
    for name in ("a", "b", "c"):  # arrived in the same coalescing window
        s.add(seq(name, 20))
    out = s.schedule()
    assert [c.seq.id for c in out.prefills] == ["a", "b", "c"] and not out.decodes
    assert all(c.completes_prompt for c in out.prefills)
    finish_prefill(out.prefills, s)
    out = s.schedule()
    assert [q.id for q in out.decodes] == ["old", "a", "b", "c"] and not out.prefills


def test_phase_keeps_decoding_while_the_head_of_the_queue_does_not_fit() -> None:
    s = _phase(max_batch_size=1)
    s.add(seq("running", 10))
    finish_prefill(s.schedule().prefills, s)
    s.add(seq("blocked", 10))
    for _ in range(3):
        out = s.schedule()
        assert [q.id for q in out.decodes] == ["running"] and not out.prefills
    assert [q.id for q in s.waiting] == ["blocked"]


def test_mixed_packs_new_prompts_beside_every_decode() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_batch_tokens=10_000,
                                  max_prefill_tokens=512, max_context=1024))
    s.add(seq("old", 10))
    finish_prefill(s.schedule().prefills, s)
    s.add(seq("new", 20))
    out = s.schedule()
    assert [q.id for q in out.decodes] == ["old"]
    assert [c.seq.id for c in out.prefills] == ["new"]


def test_unknown_policy_is_refused_with_the_choices() -> None:
    try:
        Scheduler(SchedulerConfig(policy="fifo"))  # type: ignore[arg-type]
    except ValueError as exc:
        assert "mixed" in str(exc) and "phase" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_the_setting_reaches_the_engine_config_and_refuses_other_values(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from shared.settings import Settings
    from worker.engine.factory import engine_config

    assert engine_config(Settings(), []).scheduling == Settings().scheduling
    monkeypatch.setenv("TOKENFLEET_SCHEDULING", "phase")
    monkeypatch.setenv("TOKENFLEET_PHASE_MAX_PREFILL_STEPS", "3")
    assert engine_config(Settings(), [2]).scheduling == "phase"
    assert engine_config(Settings(), [2]).phase_max_prefill_steps == 3
    monkeypatch.setenv("TOKENFLEET_SCHEDULING", "fifo")
    with pytest.raises(ValidationError, match="mixed"):
        Settings()


def _lane_seq(name: str, priority: int, prompt_len: int = 10) -> Sequence:
    s = seq(name, prompt_len)
    s.priority = priority
    return s


def test_batch_lane_leaves_the_reserved_rows_to_interactive_requests() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=6, max_batch_tokens=10_000,
                                  max_prefill_tokens=1000, max_context=512, reserve_rows=2))
    for i in range(8):
        s.add(_lane_seq(f"b{i}", 1))
    out = s.schedule()
    assert [q.id for q in out.admitted] == ["b0", "b1", "b2", "b3"]  # 6 rows - 2 reserved
    finish_prefill(out.prefills, s)
    s.add(_lane_seq("i0", 0))
    s.add(_lane_seq("i1", 0))
    s.add(_lane_seq("i2", 0))
    assert [q.id for q in s.waiting][:3] == ["i0", "i1", "i2"]  # ahead of waiting batch ones
    out = s.schedule()
    assert [q.id for q in out.admitted] == ["i0", "i1"]  # at once: the reserve was free
    assert len(out.decodes) == 4  # the batch rows keep decoding beside them
    assert s.waiting[0].id == "i2"  # the batch is full now; i2 is next, before b4


def test_reserve_also_holds_back_the_token_budget_for_the_batch_lane() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=64, max_batch_tokens=500,
                                  max_prefill_tokens=1000, max_context=512, reserve_rows=2))
    for i in range(6):
        s.add(_lane_seq(f"b{i}", 1, prompt_len=34))  # reservation 50 each
    assert [q.id for q in s.schedule().admitted] == [f"b{i}" for i in range(6)]
    # 6 + 1 + 2 reserved rows x 50 = 450 <= 500, but 7 + 1 + 2 = 10 x 50 = 500 is the limit
    s.add(_lane_seq("b6", 1, prompt_len=34))
    s.add(_lane_seq("b7", 1, prompt_len=34))
    assert [q.id for q in s.schedule().admitted] == ["b6", "b7"]
    s.add(_lane_seq("b8", 1, prompt_len=34))
    assert s.schedule().admitted == []  # 9 + 2 reserved rows x 50 > 500
    s.add(_lane_seq("i0", 0, prompt_len=34))
    assert [q.id for q in s.schedule().admitted] == ["i0"]  # 9 x 50 <= 500


def test_without_a_reserve_priorities_only_order_the_queue() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_batch_tokens=10_000,
                                  max_prefill_tokens=1000, max_context=512))
    for name, priority in (("b0", 1), ("i0", 0), ("b1", 1), ("i1", 0)):
        s.add(_lane_seq(name, priority))
    assert [q.id for q in s.schedule().admitted] == ["i0", "i1", "b0"]
