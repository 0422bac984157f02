"""bitsandbytes int8 and nf4 through the engine's runner on the real model (CPU here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.protocol import SamplingParams
from shared.settings import Settings
from worker.engine.factory import build_engine
from worker.engine.types import EngineRequest

pytestmark = pytest.mark.slow


def _chat_ids(question: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Settings().model_dir / "SmolLM2-135M-Instruct")
    ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                  add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


@pytest.mark.parametrize("quantization,max_tokens", [("nf4", 12), ("int8", 3)])
def test_quantized_model_serves(quantization: str, max_tokens: int, smollm2_dir: Path) -> None:
    engine, info = build_engine(Settings(quantization=quantization))  # type: ignore[arg-type]
    assert info.quantization == quantization
    engine.add_request(EngineRequest("q", _chat_ids("What is the capital of France?"),
                                     SamplingParams(max_tokens=max_tokens, temperature=0.0)))
    text, tokens = "", 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            text += out.text_delta
            tokens += len(out.new_token_ids)
    assert tokens == max_tokens or "Paris" in text
    if quantization == "nf4":
        assert "Paris" in text
