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


def test_int8_torch_prepared_checkpoint_round_trip(smollm2_dir: Path, tmp_path: Path) -> None:
    """`model prepare --quantization int8-torch` once, then a worker loads it as is."""
    from worker.engine.loader import load_model, prepare_quantized
    from worker.engine.quant_store import prepared_mode
    from worker.engine.weight_int8 import weight_bytes

    settings = Settings(model=str(smollm2_dir), model_dir=tmp_path, quantization="int8-torch")
    target = prepare_quantized(settings, "int8-torch")
    assert prepared_mode(target) is not None
    disk = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    assert disk < 0.55 * sum(p.stat().st_size for p in smollm2_dir.glob("*.safetensors"))
    loaded = load_model(settings, smollm2_dir)  # finds the prepared weights
    assert loaded.path == target and loaded.quantization == "int8-torch"
    plain = load_model(settings.model_copy(update={"quantization": "none"}), smollm2_dir)
    assert weight_bytes(loaded.model) <= 0.55 * weight_bytes(plain.model)
    engine, info = build_engine(settings)
    assert info.quantization == "int8-torch"
    engine.add_request(EngineRequest("q", _chat_ids("What is the capital of France?"),
                                     SamplingParams(max_tokens=12, temperature=0.0)))
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            text += out.text_delta
    assert "Paris" in text
