"""The engine on a tiny random Llama: exactness against HF generate, batch invariance,
stops, seeds, cancellation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from shared.protocol import SamplingParams
from tests.unit.tiny_model import EOS, CharDecoder, tiny_engine, tiny_llama
from worker.engine.engine import LLMEngine
from worker.engine.scheduler import SchedulerOutput
from worker.engine.types import EngineRequest, RequestOutput


def greedy(max_tokens: int = 24, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def prompt(n: int, offset: int = 0) -> list[int]:
    return [1] + [3 + (7 * i + offset) % 90 for i in range(n - 1)]


def run_all(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return outs
        for out in engine.step():
            outs.setdefault(out.id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def four_requests_tokens(engine: LLMEngine) -> dict[str, list[int]]:
    """Greedy tokens of four requests of 10-31 prompt tokens run together (prompts
    prefilled beside decoding rows, then decode), by request id."""
    for i in range(4):
        engine.add_request(EngineRequest(f"r{i}", prompt(10 + 7 * i, i), greedy(32)))
    return {rid: tokens(o) for rid, o in run_all(engine).items()}


def alone_and_in_a_batch(make: Callable[[], LLMEngine]) -> tuple[list[int], list[int]]:
    """Request "a"'s greedy tokens run alone and among six others of other lengths
    (longer and shorter, admitted before and after it), each on a fresh ``make()``."""
    alone = make()
    alone.add_request(EngineRequest("a", prompt(12), greedy(40)))
    expected = tokens(run_all(alone)["a"])
    busy = make()
    for i in range(6):
        busy.add_request(EngineRequest(f"o{i}", prompt(5 + 11 * i, i + 1), greedy(20 + 9 * i)))
        if i == 2:
            busy.add_request(EngineRequest("a", prompt(12), greedy(40)))
    return expected, tokens(run_all(busy)["a"])


def text(outs: list[RequestOutput]) -> str:
    return "".join(o.text_delta for o in outs)


@pytest.fixture(scope="module")
def model32() -> torch.nn.Module:
    return tiny_llama(torch.float32)


def test_greedy_matches_transformers_generate(model32: torch.nn.Module) -> None:
    engine = tiny_engine(model32)
    prompts = {str(i): prompt(n, i) for i, n in enumerate((3, 17, 9, 40))}
    for rid, ids in prompts.items():
        engine.add_request(EngineRequest(rid, ids, greedy(20)))
    outs = run_all(engine)
    for rid, ids in prompts.items():
        ref = model32.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20,
                               do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
        assert tokens(outs[rid]) == ref


def _alone(model: torch.nn.Module, ids: list[int], params: SamplingParams) -> list[int]:
    engine = tiny_engine(model)
    engine.add_request(EngineRequest("target", ids, params))
    return tokens(run_all(engine)["target"])


def _joining_busy_batch(model: torch.nn.Module, ids: list[int], params: SamplingParams,
                        **overrides: int) -> list[int]:
    engine = tiny_engine(model, **overrides)
    for i in range(31):  # different lengths and budgets, some finishing mid-flight
        engine.add_request(EngineRequest(f"bg{i}", prompt(5 + 3 * i, i), greedy(8 + 5 * i)))
    for _ in range(6):
        engine.step()
    assert len(engine.scheduler.running) > 8
    engine.add_request(EngineRequest("target", ids, params))
    return tokens(run_all(engine)["target"])


def test_fp32_greedy_is_identical_alone_and_in_a_batch_of_32(model32: torch.nn.Module) -> None:
    for n in (4, 23, 61):
        ids = prompt(n, 11)
        alone = _alone(model32, ids, greedy(40))
        assert _joining_busy_batch(model32, ids, greedy(40)) == alone


def test_bf16_greedy_agrees_on_95_percent_of_positions() -> None:
    model = tiny_llama(torch.bfloat16)
    agree = total = 0
    for n in (4, 23, 61):
        ids = prompt(n, 5)
        alone = _alone(model, ids, greedy(40))
        batched = _joining_busy_batch(model, ids, greedy(40))
        agree += sum(a == b for a, b in zip(alone, batched, strict=True))
        total += len(alone)
    assert agree / total >= 0.95


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(model32: torch.nn.Module) -> None:
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                            ignore_eos=True)
    ids = prompt(12, 3)
    alone = _alone(model32, ids, params)
    assert _joining_busy_batch(model32, ids, params) == alone
    other_seed = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=99,
                                ignore_eos=True)
    assert _alone(model32, ids, other_seed) != alone


def test_top_k_one_and_tiny_top_p_are_greedy(model32: torch.nn.Module) -> None:
    ids = prompt(9, 2)
    reference = _alone(model32, ids, greedy(16))
    top_k = SamplingParams(max_tokens=16, temperature=0.8, top_k=1, ignore_eos=True, seed=1)
    top_p = SamplingParams(max_tokens=16, temperature=0.8, top_p=1e-6, ignore_eos=True, seed=1)
    assert _alone(model32, ids, top_k) == reference
    assert _alone(model32, ids, top_p) == reference


def test_max_tokens_cuts_with_finish_reason_length(model32: torch.nn.Module) -> None:
    engine = tiny_engine(model32)
    engine.add_request(EngineRequest("a", prompt(6), greedy(7)))
    outs = run_all(engine)["a"]
    assert len(tokens(outs)) == 7
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert [o.finished for o in outs].count(True) == 1


def test_stop_string_cuts_text_and_is_never_streamed(model32: torch.nn.Module) -> None:
    ids = prompt(10, 4)
    free = tiny_engine(model32)
    free.add_request(EngineRequest("a", ids, greedy(30)))
    full = text(run_all(free)["a"])
    stop = full[12:14]
    expected = full[: full.find(stop)]
    engine = tiny_engine(model32)
    engine.add_request(EngineRequest("a", ids, greedy(30, stop=[stop, "\x00never"])))
    outs = run_all(engine)["a"]
    assert text(outs) == expected
    assert outs[-1].finish_reason == "stop"
    streamed = ""
    for out in outs:  # no prefix of what was streamed may contain the stop string
        streamed += out.text_delta
        assert stop not in streamed


def test_eos_stops_unless_ignored_and_min_tokens_defers_it(model32: torch.nn.Module) -> None:
    ids = prompt(8, 6)
    free = _alone(model32, ids, greedy(20))
    eos_token = free[3]
    first = free.index(eos_token)
    engine = tiny_engine(model32)
    engine.eos = frozenset({eos_token})
    engine.sampler.eos_token_ids = [eos_token]
    engine.add_request(EngineRequest("a", ids, SamplingParams(max_tokens=20, temperature=0)))
    outs = run_all(engine)["a"]
    assert tokens(outs) == free[: first + 1]
    assert outs[-1].finish_reason == "stop"
    engine.add_request(EngineRequest("b", ids, SamplingParams(max_tokens=20, temperature=0,
                                                              min_tokens=10)))
    later = tokens(run_all(engine)["b"])
    assert len(later) >= 10
    assert eos_token not in later[:9]


def test_abort_frees_the_row_at_the_next_step(model32: torch.nn.Module) -> None:
    engine = tiny_engine(model32)
    for i in range(4):
        engine.add_request(EngineRequest(f"r{i}", prompt(10, i), greedy(50)))
    engine.step()
    engine.step()
    assert engine.cache.num_rows == 4
    engine.abort_request("r1")
    outs = engine.step()
    cancelled = [o for o in outs if o.id == "r1"]
    assert cancelled and cancelled[0].finish_reason == "cancelled"
    assert engine.cache.num_rows == 3
    assert "r1" not in engine.cache
    assert len(engine.scheduler.running) == 3
    rest = run_all(engine)
    assert {"r0", "r2", "r3"} == set(rest)


def test_rejects_prompts_that_do_not_fit(model32: torch.nn.Module) -> None:
    engine = tiny_engine(model32)
    engine.add_request(EngineRequest("long", [5] * 600, greedy(4)))
    engine.add_request(EngineRequest("badtoken", [5, 10_000], greedy(4)))
    outs = run_all(engine)
    assert outs["long"][0].finish_reason == "error" and "context" in (outs["long"][0].error or "")
    assert outs["badtoken"][0].finish_reason == "error"


def test_decoder_roundtrip_helper() -> None:
    decoder = CharDecoder()
    assert decoder.decode(decoder.encode("hello world")) == "hello world"
    assert decoder.decode([EOS, 1]) == ""


class _PoisonRunner:
    """Wraps a runner; any forward pass that sees ``POISON`` raises, like a bad input would."""

    POISON = 77

    def __init__(self, runner: object) -> None:
        self.inner = runner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        if self.POISON in token_ids:
            raise RuntimeError("poisoned decode")
        return self.inner.decode(token_ids, positions)  # type: ignore[attr-defined]

    def prefill(self, chunks: list) -> torch.Tensor:  # type: ignore[type-arg]
        if any(self.POISON in c.token_ids for c in chunks):
            raise MemoryError("poisoned prefill")
        return self.inner.prefill(chunks)  # type: ignore[attr-defined]

    def decode_and_prefill(self, token_ids: list[int], positions: list[int],
                           chunks: list) -> torch.Tensor:  # type: ignore[type-arg]
        if self.POISON in token_ids or any(self.POISON in c.token_ids for c in chunks):
            raise RuntimeError("poisoned step")
        return self.inner.decode_and_prefill(  # type: ignore[attr-defined]
            token_ids, positions, chunks)


def test_a_failing_request_fails_alone_and_the_batch_keeps_its_tokens(
        model32: torch.nn.Module) -> None:
    clean = {f"ok{i}": prompt(6 + 4 * i, i) for i in range(4)}
    reference = {rid: _alone(model32, ids, greedy(12)) for rid, ids in clean.items()}
    engine = tiny_engine(model32)
    engine.runner = _PoisonRunner(engine.runner)  # type: ignore[assignment]
    for rid, ids in clean.items():
        engine.add_request(EngineRequest(rid, ids, greedy(12)))
    first = engine.step()
    engine.add_request(EngineRequest("bad", [1, 5, _PoisonRunner.POISON, 9], greedy(12)))
    outs = run_all(engine)
    for out in first:
        outs[out.id].insert(0, out)
    assert outs["bad"][-1].finish_reason == "error"
    assert "MemoryError" in (outs["bad"][-1].error or "")
    for rid in clean:
        assert tokens(outs[rid]) == reference[rid]
    assert engine.cache.num_rows == 0 and not engine.seqs


def _staggered_run(model: torch.nn.Module, scheduling: str,
                   ) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
    """Requests of different lengths arriving over the first steps, one prompt longer than
    the prefill budget; the tokens of each and every step's (decodes, prefill chunks)."""
    engine = tiny_engine(model, scheduling=scheduling, max_prefill_tokens=32)
    plans: list[tuple[int, int]] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        plan = schedule()
        plans.append((len(plan.decodes), len(plan.prefills)))
        return plan

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    outs: dict[str, list[RequestOutput]] = {}
    arrivals = {0: [5, 12, 3], 2: [70], 5: [9, 30], 9: [4]}  # step -> prompt lengths
    for step in range(10_000):
        for n in arrivals.get(step, []):
            rid = f"s{step}-{n}"
            engine.add_request(EngineRequest(rid, prompt(n, step), greedy(6 + n % 11)))
        if step > max(arrivals) and not engine.has_unfinished():
            break
        for out in engine.step():
            outs.setdefault(out.id, []).append(out)
    return {rid: tokens(o) for rid, o in outs.items()}, plans


def test_both_scheduling_policies_give_the_same_greedy_tokens(
        model32: torch.nn.Module) -> None:
    mixed, mixed_plans = _staggered_run(model32, "mixed")
    phase, phase_plans = _staggered_run(model32, "phase")
    assert len(mixed) == 7 and phase == mixed
    assert any(d and p for d, p in mixed_plans)  # mixed packs chunks beside decodes
    assert not any(d and p for d, p in phase_plans)  # phase never does
    assert len(phase_plans) > len(mixed_plans)  # the paused decodes cost steps
