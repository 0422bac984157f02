"""Prompt-lookup speculative decoding on the real SmolLM2-135M (fp32): a copy task gives the
same greedy tokens with and without it, alone and beside other rows, and proposals get
accepted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.workload import COPY_INSTRUCTION, COPY_TEXTS
from tests.integration.test_engine_smollm2 import _chat, _engine, _greedy, _load
from worker.engine.engine import LLMEngine
from worker.engine.loader import LoadedModel
from worker.engine.speculative import SpeculativeConfig
from worker.engine.types import EngineRequest, RequestOutput

pytestmark = pytest.mark.slow


def _spec_engine(loaded: LoadedModel, method: str) -> LLMEngine:
    plain = _engine(loaded)
    config = replace(plain.config, speculative=SpeculativeConfig(method, max_rows=4))  # type: ignore[arg-type]
    return LLMEngine(plain.runner, plain.decoder, config)


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
