"""Speculative decoding (prompt lookup) on the tiny random Llama: the same tokens as plain
decoding, alone and in a busy batch, with stops and max_tokens cutting inside an accepted
run; seeded sampling unchanged; opt-out, penalties and load turn it off."""

from __future__ import annotations

import pytest
import torch

from shared.protocol import SamplingParams
from tests.unit.test_engine import greedy, prompt, run_all, text, tokens
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine.engine import LLMEngine
from worker.engine.speculative import (
    SpeculativeConfig,
    accepted_run,
    propose_ngram,
)
from worker.engine.types import EngineRequest, EngineStats, RequestOutput
from worker.metrics import WorkerMetrics

NGRAM = SpeculativeConfig("ngram", num_tokens=4, ngram_max=3, ngram_min=1, max_rows=64)


@pytest.fixture(scope="module")
def model32() -> torch.nn.Module:
    return tiny_llama(torch.float32)


def _run(model: torch.nn.Module, ids: list[int], params: SamplingParams,
         spec: SpeculativeConfig | None = None) -> tuple[list[RequestOutput], LLMEngine]:
    engine = tiny_engine(model, speculative=spec or SpeculativeConfig())  # type: ignore[arg-type]
    engine.add_request(EngineRequest("a", ids, params))
    return run_all(engine)["a"], engine


def test_propose_ngram_takes_the_latest_longest_match() -> None:
    assert propose_ngram([5, 6, 7, 8, 9, 5, 6], 3, 3, 1) == [7, 8, 9]
    # the 2-gram (1, 2) is preferred over the later 1-gram (2)
    assert propose_ngram([1, 2, 3, 4, 2, 9, 1, 2], 2, 2, 1) == [3, 4]
    assert propose_ngram([1, 2, 3, 2, 7], 2, 2, 1) == []  # 7 never occurred before
    assert propose_ngram([4, 4], 5, 3, 1) == [4]  # only what exists after the match
    assert propose_ngram([1, 2, 3, 1], 2, 3, 2) == []  # no 2-gram repeats
    assert propose_ngram([3, 1, 2, 3], 0, 3, 1) == []


def test_accepted_run_keeps_the_first_differing_pick() -> None:
    assert accepted_run([7, 8, 9], [7, 8, 5, 1]) == [7, 8, 5]
    assert accepted_run([7, 8, 9], [1, 8, 9, 4]) == [1]
    assert accepted_run([7, 8], [7, 8, 3]) == [7, 8, 3]


def test_config_rejects_unknown_methods() -> None:
    with pytest.raises(ValueError, match="ngram"):
        SpeculativeConfig("medusa")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SpeculativeConfig("ngram", num_tokens=0)


def test_greedy_tokens_are_identical_and_proposals_get_accepted(model32: torch.nn.Module,
                                                                ) -> None:
    proposed = accepted = 0
    for offset in (0, 1, 2):
        ids = prompt(30, offset)
        plain, _ = _run(model32, ids, greedy(48))
        spec, engine = _run(model32, ids, greedy(48), NGRAM)
        assert tokens(spec) == tokens(plain)
        assert text(spec) == text(plain)
        assert spec[-1].finish_reason == "length"
        assert len(spec) < len(plain)  # some steps emitted several tokens
        proposed += engine.stats().spec_proposed
        accepted += engine.stats().spec_accepted
    assert 0 < accepted < proposed


def run_beside_a_busy_batch(engine: LLMEngine, ids: list[int], background: int,
                            ) -> dict[str, list[RequestOutput]]:
    """``background`` requests (``bg0``...) decode for 4 steps, then ``a`` (``ids``, 40
    greedy tokens) joins them; every request's outputs, run to the end."""
    for i in range(background):
        engine.add_request(EngineRequest(f"bg{i}", prompt(5 + 4 * i, i), greedy(10 + 4 * i)))
    early: dict[str, list[RequestOutput]] = {}
    for _ in range(4):
        for out in engine.step():
            early.setdefault(out.id, []).append(out)
    engine.add_request(EngineRequest("a", ids, greedy(40)))
    outs = run_all(engine)
    for rid, got in early.items():
        outs[rid] = got + outs.get(rid, [])
    return outs


def assert_background_unchanged(model: torch.nn.Module, outs: dict[str, list[RequestOutput]],
                                background: int) -> None:
    """The rows of ``run_beside_a_busy_batch`` give the tokens they give decoded alone."""
    for i in range(background):
        plain, _ = _run(model, prompt(5 + 4 * i, i), greedy(10 + 4 * i))
        assert tokens(outs[f"bg{i}"]) == tokens(plain)


def test_greedy_in_a_busy_batch_matches_plain_decoding_alone(model32: torch.nn.Module) -> None:
    ids = prompt(30, 1)
    alone, _ = _run(model32, ids, greedy(40))
    engine = tiny_engine(model32, speculative=NGRAM)  # type: ignore[arg-type]
    outs = run_beside_a_busy_batch(engine, ids, 12)
    assert tokens(outs["a"]) == tokens(alone)
    assert engine.stats().spec_accepted > 0
    assert_background_unchanged(model32, outs, 12)


def _inside_a_run(outs: list[RequestOutput]) -> int:
    """Tokens emitted before the first step that emitted at least three."""
    before = 0
    for out in outs:
        if len(out.new_token_ids) >= 3:
            return before
        before += len(out.new_token_ids)
    raise AssertionError("no step accepted two proposals")


def test_max_tokens_and_stop_strings_cut_inside_an_accepted_run(model32: torch.nn.Module,
                                                                 ) -> None:
    ids = prompt(30, 1)
    free, _ = _run(model32, ids, greedy(48), NGRAM)
    before = _inside_a_run(free)
    cut = before + 2  # the run's second token
    plain, _ = _run(model32, ids, greedy(cut))
    spec, _ = _run(model32, ids, greedy(cut), NGRAM)
    assert tokens(spec) == tokens(plain) == tokens(free)[:cut]
    assert spec[-1].finish_reason == plain[-1].finish_reason == "length"
    full = text(free)
    stop = full[before + 1:before + 3]  # starts at the run's second token
    plain, _ = _run(model32, ids, greedy(48, stop=[stop]))
    spec, _ = _run(model32, ids, greedy(48, stop=[stop]), NGRAM)
    assert text(spec) == text(plain) == full[:full.find(stop)]
    assert tokens(spec) == tokens(plain)
    assert spec[-1].finish_reason == plain[-1].finish_reason == "stop"
    assert spec[-1].num_output_tokens == plain[-1].num_output_tokens


def test_eos_inside_a_run_stops_as_without_speculation(model32: torch.nn.Module) -> None:
    ids = prompt(30, 1)
    free, _ = _run(model32, ids, greedy(48), NGRAM)
    eos_token = tokens(free)[_inside_a_run(free) + 1]
    results = []
    for spec in (SpeculativeConfig(), NGRAM):
        engine = tiny_engine(model32, speculative=spec)  # type: ignore[arg-type]
        engine.eos = frozenset({eos_token})
        engine.sampler.eos_token_ids = [eos_token]
        engine.add_request(EngineRequest("a", ids, SamplingParams(max_tokens=48,
                                                                  temperature=0)))
        outs = run_all(engine)["a"]
        results.append((tokens(outs), outs[-1].finish_reason))
    assert results[0] == results[1]
    assert results[0][1] == "stop" and results[0][0][-1] == eos_token


def test_seeded_sampling_gives_the_tokens_it_gives_without_speculation(
        model32: torch.nn.Module) -> None:
    ids = prompt(30, 1)
    params = SamplingParams(max_tokens=40, temperature=0.5, top_k=20, seed=7, ignore_eos=True)
    plain, _ = _run(model32, ids, params)
    spec, engine = _run(model32, ids, params, NGRAM)
    again, _ = _run(model32, ids, params, NGRAM)
    assert tokens(spec) == tokens(plain) == tokens(again)
    assert engine.stats().spec_accepted > 0
    other = SamplingParams(max_tokens=40, temperature=0.5, top_k=20, seed=8, ignore_eos=True)
    assert tokens(_run(model32, ids, other, NGRAM)[0]) != tokens(spec)


def test_opt_out_penalties_and_a_full_batch_do_not_speculate(model32: torch.nn.Module) -> None:
    ids = prompt(30, 1)
    _, engine = _run(model32, ids, greedy(24, speculative=False), NGRAM)
    assert engine.stats().spec_proposed == 0
    _, engine = _run(model32, ids, greedy(24, repetition_penalty=1.3), NGRAM)
    assert engine.stats().spec_proposed == 0
    small = SpeculativeConfig("ngram", num_tokens=4, max_rows=2)
    engine = tiny_engine(model32, speculative=small)  # type: ignore[arg-type]
    for i in range(3):
        engine.add_request(EngineRequest(str(i), prompt(30, i), greedy(24)))
    for _ in range(2):  # prefill, then three rows decode: more than max_rows
        engine.step()
    assert len(engine.scheduler.running) == 3
    assert engine.stats().spec_proposed == 0


def _seqs(n: int) -> list:
    from worker.engine.sequence import Sequence

    out = []
    for i in range(n):
        seq = Sequence(str(i), [5, 6, 7, 8, 5, 6, 7, 8, 5, 6], greedy(32), 0.0)
        seq.num_cached = seq.num_prompt_tokens - 1
        out.append(seq)
    return out


def test_rows_step_aside_by_their_acceptance_as_the_batch_fills() -> None:
    """Default (measured) steps: alone a row always speculates; among more rows only while
    its own acceptance reaches that batch size's bound; above the last bound never."""
    from worker.engine.speculative import STEP_ASIDE, Speculator, min_acceptance

    spec = Speculator(SpeculativeConfig("ngram"))
    steps = STEP_ASIDE["ngram"]
    largest = steps[-1][0]
    assert set(spec.propose(_seqs(1), 512)) == {"0"}
    four = _seqs(4)
    assert set(spec.propose(four, 512)) == {"0", "1", "2", "3"}  # the prior lets them try
    spec.record("0", 4, 0)  # row 0 missed everything, row 1 took everything
    spec.record("1", 4, 4)
    bound = min_acceptance("ngram", 4)
    assert bound is not None and spec.acceptance("0") < bound <= spec.acceptance("1")
    assert "0" not in spec.propose(four, 512) and "1" in spec.propose(four, 512)
    assert "0" in spec.propose(four[:1], 512)  # alone it tries again
    eight = _seqs(8)  # above PROBE_ROWS only rows with evidence and the acceptance speculate
    spec.record("1", 4, 4)
    spec.record("2", 8, 3)
    assert min_acceptance("ngram", 8) is not None
    assert set(spec.propose(eight, 512)) == {"1"}
    assert spec.propose(_seqs(largest + 1), 512) == {}
    assert min_acceptance("ngram", largest + 1) is None
    spec.forget("0")
    assert spec.acceptance("0") == 1.0


def test_metrics_count_the_increase_of_the_engines_cumulative_speculation_counts() -> None:
    metrics = WorkerMetrics("m", "w")
    value = metrics.registry.get_sample_value
    labels = {"model_name": "m"}
    assert value("tokenfleet:spec_decode_num_draft_tokens_total", labels) == 0
    for proposed, accepted in ((8, 5), (8, 5), (20, 9)):  # a step without speculation
        metrics.on_engine_stats(EngineStats(spec_proposed=proposed, spec_accepted=accepted))
    assert value("tokenfleet:spec_decode_num_draft_tokens_total", labels) == 20
    assert value("tokenfleet:spec_decode_num_accepted_tokens_total", labels) == 9


def test_a_rows_k_grows_while_accepted_whole_and_shrinks_on_a_rejection() -> None:
    """Doubling on a proposal accepted whole, up to the ceiling; a rejection sets k to the
    accepted run + 1 (below the k it had, at least 1); a row that leaves forgets its k; a
    ceiling at or below ``num_tokens`` keeps k fixed."""
    from worker.engine.speculative import Speculator

    spec = Speculator(SpeculativeConfig("ngram", num_tokens=4, max_num_tokens=9, max_rows=64))
    (row,) = _seqs(1)
    assert spec.eligible(row, 512) == 4
    seen = []
    for _ in range(4):
        k = spec.eligible(row, 512)
        spec.record(row.id, k, k)
        seen.append(spec.eligible(row, 512))
    assert seen == [8, 9, 9, 9]
    spec.record(row.id, 9, 3)
    assert spec.eligible(row, 512) == 4
    spec.record(row.id, 4, 3)  # rejected at the last position: one less than it had
    assert spec.eligible(row, 512) == 3
    for _ in range(10):
        spec.record(row.id, 2, 0)
    assert spec.eligible(row, 512) == 1
    spec.forget(row.id)
    assert spec.eligible(row, 512) == 4
    fixed = Speculator(SpeculativeConfig("ngram", num_tokens=4, max_rows=64))
    fixed.record(row.id, 4, 4)
    assert fixed.eligible(row, 512) == 4
    with pytest.raises(ValueError, match="max_num_tokens"):
        SpeculativeConfig("ngram", max_num_tokens=-1)


def test_greedy_tokens_are_identical_with_an_adaptive_k(model32: torch.nn.Module) -> None:
    adaptive = SpeculativeConfig("ngram", num_tokens=2, max_num_tokens=12, ngram_max=3,
                                 ngram_min=1, max_rows=64)
    for offset in (0, 2):
        ids = prompt(30, offset)
        plain, _ = _run(model32, ids, greedy(48))
        spec, engine = _run(model32, ids, greedy(48), adaptive)
        assert tokens(spec) == tokens(plain)
        assert spec[-1].finish_reason == "length"
        assert engine.stats().spec_accepted > 0
        assert max(len(o.new_token_ids) for o in spec) <= 13
