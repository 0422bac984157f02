"""A tiny random Llama built in memory, and a toy token decoder, for engine tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine.engine import EngineConfig, LLMEngine
from worker.engine.model_runner import TransformerRunner

VOCAB = 96
EOS = 2


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0,
               max_positions: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties
        model.lm_head.weight.mul_(8.0)
    return model


class CharDecoder:
    """Token i < 3 is special; token i >= 3 is the character chr(ord(' ') + i - 3)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i - 3) for i in ids if i >= 3)

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 + 3 for c in text]


def tiny_engine(model: LlamaForCausalLM, **overrides: int | str) -> LLMEngine:
    config = EngineConfig(eos_token_ids=(EOS,), **overrides)  # type: ignore[arg-type]
    return LLMEngine(TransformerRunner(model), CharDecoder(), config)
