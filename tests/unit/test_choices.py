"""n > 1 in the engine: the prompt is prefilled once and forked, each choice samples with
its own seed stream (the set is reproducible), outputs carry their index, the request ends
with its last choice, and an abort ends every choice."""

from __future__ import annotations

import torch

from shared.protocol import SamplingParams
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine.engine import LLMEngine
from worker.engine.types import EngineRequest, RequestOutput

PROMPT = [1, 4, 9, 16, 25, 36]


def _drain(engine: LLMEngine) -> list[RequestOutput]:
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def _choices(outs: list[RequestOutput], rid: str) -> dict[int, list[int]]:
    got: dict[int, list[int]] = {}
    for out in outs:
        if out.id == rid:
            got.setdefault(out.index, []).extend(out.new_token_ids)
    return got


def test_n_choices_share_one_prefill_and_are_reproducible() -> None:
    model = tiny_llama(torch.float32)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True, n=3)
    engine = tiny_engine(model)
    prefilled: list[int] = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda chunks: (prefilled.extend(len(c.token_ids) for c in chunks)
                                            or prefill(chunks))  # type: ignore[method-assign]
    engine.add_request(EngineRequest("r", PROMPT, params))
    outs = _drain(engine)
    assert sum(prefilled) == len(PROMPT)  # one prefill for three choices
    got = _choices(outs, "r")
    assert sorted(got) == [0, 1, 2] and all(len(t) == 6 for t in got.values())
    assert len({tuple(t) for t in got.values()}) > 1  # different seed streams
    final = [o for o in outs if o.finished]
    assert len(final) == 1 and final[0].num_output_tokens == 18 and final[0] is outs[-1]
    assert sorted(o.index for o in outs if o.choice_finish_reason == "length") == [0, 1, 2]
    again = tiny_engine(model)
    again.add_request(EngineRequest("r", PROMPT, params))
    assert _choices(_drain(again), "r") == got
    assert engine.cache.num_rows == 0 and not engine.seqs


def test_choice_zero_matches_the_same_request_with_n_1() -> None:
    model = tiny_llama(torch.float32)
    one = tiny_engine(model)
    one.add_request(EngineRequest("r", PROMPT, SamplingParams(
        max_tokens=5, temperature=0.8, seed=3, ignore_eos=True)))
    many = tiny_engine(model)
    many.add_request(EngineRequest("r", PROMPT, SamplingParams(
        max_tokens=5, temperature=0.8, seed=3, ignore_eos=True, n=2)))
    many.add_request(EngineRequest("other", [1, 2, 3], SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True)))
    assert _choices(_drain(many), "r")[0] == _choices(_drain(one), "r")[0]


def test_greedy_choices_are_identical_and_the_row_copy_is_exact() -> None:
    engine = tiny_engine(tiny_llama(torch.float32))
    engine.add_request(EngineRequest("g", PROMPT, SamplingParams(
        max_tokens=7, temperature=0.0, ignore_eos=True, n=4)))
    got = _choices(_drain(engine), "g")
    assert len(got) == 4 and all(t == got[0] for t in got.values())


def test_abort_ends_every_choice() -> None:
    engine = tiny_engine(tiny_llama(torch.float32))
    engine.add_request(EngineRequest("a", PROMPT, SamplingParams(
        max_tokens=50, temperature=1.0, seed=1, ignore_eos=True, n=3)))
    engine.step()
    engine.step()
    engine.abort_request("a")
    outs = _drain(engine)
    final = [o for o in outs if o.finished]
    assert len(final) == 1 and final[0].finish_reason == "cancelled" and final[0].id == "a"
    assert not engine.seqs and engine.cache.num_rows == 0


def test_n_counts_in_the_kv_budget() -> None:
    engine = tiny_engine(tiny_llama(torch.float32), max_batch_tokens=64)
    engine.add_request(EngineRequest("big", PROMPT, SamplingParams(max_tokens=20, n=4)))
    out = _drain(engine)[-1]
    assert out.finish_reason == "error" and "max_batch_tokens" in (out.error or "")
