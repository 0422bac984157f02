"""Speculative decoding with a draft (a second model with its own cache rows, or the target's
first layers) on the tiny random Llama: the same tokens as plain decoding, alone and in a
busy batch, with stops and max_tokens cutting inside an accepted run; seeded sampling
unchanged; draft rows freed and rolled back."""

from __future__ import annotations

import copy

import pytest
import torch

from shared.protocol import SamplingParams
from tests.unit.test_engine import greedy, prompt, run_all, text, tokens
from tests.unit.test_speculative import assert_background_unchanged, run_beside_a_busy_batch
from tests.unit.tiny_model import CharDecoder, tiny_llama
from worker.engine.draft import DraftProposer, early_exit_runner
from worker.engine.engine import EngineConfig, LLMEngine
from worker.engine.model_runner import TransformerRunner
from worker.engine.speculative import SpeculativeConfig, min_acceptance
from worker.engine.types import EngineRequest, RequestOutput

DRAFT = SpeculativeConfig("draft", num_tokens=4, max_rows=64)
FULL = SpeculativeConfig("draft", num_tokens=4, max_rows=64, draft_layers=2)  # the whole model


@pytest.fixture(scope="module")
def model32() -> torch.nn.Module:
    return tiny_llama(torch.float32)


@pytest.fixture(scope="module")
def near_copy(model32: torch.nn.Module) -> torch.nn.Module:
    """The target with noise on its weights: a draft that agrees often, not always."""
    draft = copy.deepcopy(model32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.003)  # init std is 0.02
    return draft


def _engine(model: torch.nn.Module, spec: SpeculativeConfig,
            draft: torch.nn.Module | None = None) -> LLMEngine:
    config = EngineConfig(eos_token_ids=(2,), speculative=spec)
    return LLMEngine(TransformerRunner(model), CharDecoder(), config,
                     draft=TransformerRunner(draft) if draft is not None else None)


def _run(model: torch.nn.Module, ids: list[int], params: SamplingParams,
         spec: SpeculativeConfig | None = None, draft: torch.nn.Module | None = None,
         ) -> tuple[list[RequestOutput], LLMEngine]:
    engine = _engine(model, spec or SpeculativeConfig(), draft)
    engine.add_request(EngineRequest("a", ids, params))
    return run_all(engine)["a"], engine


def _proposer(engine: LLMEngine) -> DraftProposer:
    proposer = engine.speculator.proposer
    assert isinstance(proposer, DraftProposer)
    return proposer


def test_a_full_depth_self_draft_is_always_accepted(model32: torch.nn.Module) -> None:
    """With every layer the self-draft is the target: all proposals match, so verification
    and the draft's own catch-up and rollback are exact."""
    ids = prompt(30, 1)
    plain, _ = _run(model32, ids, greedy(40))
    spec, engine = _run(model32, ids, greedy(40), FULL)
    assert tokens(spec) == tokens(plain)
    stats = engine.stats()
    assert stats.spec_proposed > 0 and stats.spec_accepted == stats.spec_proposed
    assert len(spec) < len(plain) / 3
    assert _proposer(engine).cache.num_rows == 0  # freed with the request


def test_self_draft_from_the_first_layer_keeps_greedy_tokens(model32: torch.nn.Module) -> None:
    spec_config = SpeculativeConfig("draft", num_tokens=3, max_rows=64, draft_layers=1)
    for offset in (0, 2):
        ids = prompt(30, offset)
        plain, _ = _run(model32, ids, greedy(40))
        spec, engine = _run(model32, ids, greedy(40), spec_config)
        assert tokens(spec) == tokens(plain)
        assert text(spec) == text(plain)
        assert engine.stats().spec_proposed > 0


def test_early_exit_runner_shares_weights_and_owns_its_cache(model32: torch.nn.Module) -> None:
    target = TransformerRunner(model32)
    draft = early_exit_runner(target, 1)
    assert len(draft.layers) == 1 and draft.layers[0] is target.layers[0]
    assert draft.lm_head is target.lm_head
    assert draft.cache is not target.cache and draft.cache.shape.num_layers == 1
    assert len(target.layers) == 2
    with pytest.raises(ValueError):
        early_exit_runner(target, 3)


def test_a_draft_model_keeps_greedy_tokens_and_gets_accepted(
        model32: torch.nn.Module, near_copy: torch.nn.Module) -> None:
    proposed = accepted = 0
    for offset in (0, 1, 2):
        ids = prompt(30, offset)
        plain, _ = _run(model32, ids, greedy(48))
        spec, engine = _run(model32, ids, greedy(48), DRAFT, near_copy)
        assert tokens(spec) == tokens(plain)
        assert spec[-1].finish_reason == "length"
        proposed += engine.stats().spec_proposed
        accepted += engine.stats().spec_accepted
    assert 0 < accepted < proposed


def test_draft_in_a_busy_batch_matches_plain_decoding_alone(
        model32: torch.nn.Module, near_copy: torch.nn.Module) -> None:
    ids = prompt(30, 1)
    alone, _ = _run(model32, ids, greedy(40))
    engine = _engine(model32, DRAFT, near_copy)
    outs = run_beside_a_busy_batch(engine, ids, 10)
    assert tokens(outs["a"]) == tokens(alone)
    assert engine.stats().spec_accepted > 0
    assert_background_unchanged(model32, outs, 10)
    assert _proposer(engine).cache.num_rows == 0


def _inside_a_run(outs: list[RequestOutput]) -> int:
    before = 0
    for out in outs:
        if len(out.new_token_ids) >= 3:
            return before
        before += len(out.new_token_ids)
    raise AssertionError("no step accepted two proposals")


def test_max_tokens_and_stop_strings_cut_inside_an_accepted_run(
        model32: torch.nn.Module) -> None:
    """With the full-depth self-draft every run is accepted whole, so cuts land inside."""
    ids = prompt(30, 1)
    free, _ = _run(model32, ids, greedy(48), FULL)
    before = _inside_a_run(free)
    cut = before + 2
    plain, _ = _run(model32, ids, greedy(cut))
    spec, _ = _run(model32, ids, greedy(cut), FULL)
    assert tokens(spec) == tokens(plain) == tokens(free)[:cut]
    assert spec[-1].finish_reason == plain[-1].finish_reason == "length"
    full = text(free)
    stop = full[before + 1:before + 3]
    plain, _ = _run(model32, ids, greedy(48, stop=[stop]))
    spec, _ = _run(model32, ids, greedy(48, stop=[stop]), FULL)
    assert text(spec) == text(plain) == full[:full.find(stop)]
    assert spec[-1].finish_reason == plain[-1].finish_reason == "stop"


def test_seeded_sampling_gives_the_tokens_it_gives_without_speculation(
        model32: torch.nn.Module, near_copy: torch.nn.Module) -> None:
    ids = prompt(30, 1)
    params = SamplingParams(max_tokens=40, temperature=0.5, top_k=20, seed=7, ignore_eos=True)
    plain, _ = _run(model32, ids, params)
    spec, engine = _run(model32, ids, params, DRAFT, near_copy)
    assert tokens(spec) == tokens(plain)
    assert engine.stats().spec_accepted > 0


def test_a_draft_with_another_vocabulary_is_refused(model32: torch.nn.Module) -> None:
    other = tiny_llama(torch.float32)
    other.resize_token_embeddings(128)
    with pytest.raises(ValueError, match="vocabulary"):
        _engine(model32, DRAFT, other)


def test_draft_steps_aside_beyond_its_measured_rows(model32: torch.nn.Module) -> None:
    spec = SpeculativeConfig("draft", num_tokens=4, draft_layers=1)
    n = 1
    while min_acceptance("draft", n) is not None:
        n += 1
    engine = _engine(model32, spec)
    for i in range(n):
        engine.add_request(EngineRequest(str(i), prompt(30, i), greedy(24)))
    for _ in range(2):
        engine.step()
    assert len(engine.scheduler.running) == n
    assert engine.stats().spec_proposed == 0
