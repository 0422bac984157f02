"""Speculative decoding on the real SmolLM2-135M (fp32): prompt lookup on a copy task, a
self-draft and a draft model (TOKENFLEET_DRAFT_MODEL) give the same greedy tokens as without
speculation, alone and beside other rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.workload import COPY_INSTRUCTION, COPY_TEXTS
from shared.settings import Settings
from tests.integration.test_engine_smollm2 import _chat, _engine, _greedy, _load
from worker.engine.engine import LLMEngine
from worker.engine.factory import load_draft
from worker.engine.loader import LoadedModel
from worker.engine.model_runner import ModelRunner
from worker.engine.speculative import SpeculativeConfig
from worker.engine.types import EngineRequest, RequestOutput

pytestmark = pytest.mark.slow


def _spec_engine(loaded: LoadedModel, method: str, draft: ModelRunner | None = None,
                 layers: int = 8) -> LLMEngine:
    plain = _engine(loaded)
    spec = SpeculativeConfig(method, max_rows=4, draft_layers=layers)  # type: ignore[arg-type]
    return LLMEngine(plain.runner, plain.decoder, replace(plain.config, speculative=spec),
                     draft=draft)


def _run(engine: LLMEngine, prompts: list[list[int]], n: int) -> dict[str, list[int]]:
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), ids, _greedy(n)))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        out: RequestOutput
        for out in engine.step():
            got.setdefault(out.id, []).extend(out.new_token_ids)
    return got


def test_copy_task_greedy_tokens_are_unchanged_and_accepted() -> None:
    loaded = _load("float32")
    prompts = [_chat(loaded, COPY_INSTRUCTION + text) for text in COPY_TEXTS[:3]]
    for batch in ([prompts[0]], prompts):
        plain = _run(_spec_engine(loaded, "off"), batch, 48)
        engine = _spec_engine(loaded, "ngram")
        spec = _run(engine, batch, 48)
        assert spec == plain
        stats = engine.stats()
        assert stats.spec_accepted > stats.spec_proposed // 4 > 0


def test_self_draft_and_a_draft_model_keep_greedy_tokens(tmp_path: Path) -> None:
    loaded = _load("float32")
    prompts = [_chat(loaded, q) for q in ("What is the capital of France?",
                                          "Name three colours.", "Count from one to ten.")]
    # a draft model directory: the model cut to its first 4 layers, with its tokenizer
    cut = type(loaded.model)(replace_layers(loaded.model.config, 4))
    cut.load_state_dict(loaded.model.state_dict(), strict=False)
    cut.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    settings = Settings(dtype="float32", speculative="draft", draft_model=str(tmp_path))
    draft = load_draft(settings, loaded)
    assert draft is not None and len(draft.layers) == 4
    for batch in ([prompts[0]], prompts):
        plain = _run(_spec_engine(loaded, "off"), batch, 24)
        for engine in (_spec_engine(loaded, "draft", layers=4),
                       _spec_engine(loaded, "draft", draft=draft)):
            assert _run(engine, batch, 24) == plain
            assert engine.stats().spec_proposed > 0


def replace_layers(config: object, layers: int) -> object:
    import copy

    config = copy.deepcopy(config)
    config.num_hidden_layers = layers  # type: ignore[attr-defined]
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]  # type: ignore[attr-defined]
    return config


def test_a_draft_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    from shared.errors import ModelLoadError

    loaded = _load("float32")
    other = type(loaded.model)(replace_layers(loaded.model.config, 1)).to(torch.float32)
    other.save_pretrained(tmp_path)
    loaded.tokenizer.add_tokens(["<tokenfleet-test-token>"])  # this copy only
    loaded.tokenizer.save_pretrained(tmp_path)
    settings = Settings(dtype="float32", speculative="draft", draft_model=str(tmp_path))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_draft(settings, _load("float32"))
