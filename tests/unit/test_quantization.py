"""Weight-only int8 (``int8-torch``), its pre-quantized checkpoints, and ``auto``'s choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.errors import ModelLoadError
from shared.protocol import SamplingParams
from shared.settings import Settings
from tests.unit.tiny_model import tiny_engine, tiny_llama
from worker.engine import weight_int8
from worker.engine.loader import pick_quantization
from worker.engine.quant_choice import (
    MIN_SPEEDUP,
    Capabilities,
    Quality,
    candidate_speedups,
    choose_quantization,
)
from worker.engine.quant_store import load_quantized, prepared_mode, save_quantized
from worker.engine.types import EngineRequest

BF16 = torch.bfloat16


def _tied_llama() -> torch.nn.Module:
    model = tiny_llama(BF16)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def test_int8_logits_stay_close_and_weights_shrink() -> None:
    ids = [1, 5, 9, 30, 41, 7, 3, 60]
    reference = tiny_llama(BF16)
    quantized = weight_int8.quantize_model(tiny_llama(BF16), BF16)
    assert type(quantized.model.layers[0].mlp.up_proj) is weight_int8.Int8Linear
    assert weight_int8.is_int8_model(quantized)
    ref, got = _logits(reference, ids), _logits(quantized, ids)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert weight_int8.weight_bytes(quantized) < 0.6 * weight_int8.weight_bytes(reference)


def test_both_int8_paths_compute_the_same_product() -> None:
    torch.manual_seed(1)
    weight = torch.randn(128, 64).to(BF16)
    q, scale = weight_int8.quantize_rows(weight, BF16)
    layer = weight_int8.Int8Linear(q, scale, None)
    x = torch.randn(weight_int8.INT8PACK_MAX_ROWS + 4, 64).to(BF16)
    few = layer(x[:weight_int8.INT8PACK_MAX_ROWS])  # int8pack kernel
    many = layer(x)  # dequantize + matmul
    exact = x.float() @ (q.float() * scale.float()[:, None]).T
    for out in (few, many[:weight_int8.INT8PACK_MAX_ROWS]):
        assert torch.allclose(out.float(), exact[:weight_int8.INT8PACK_MAX_ROWS],
                              atol=0.1, rtol=0.02)


def test_a_tied_table_is_quantized_and_stored_once() -> None:
    model = weight_int8.quantize_model(_tied_llama(), BF16)
    assert model.lm_head is model.model.embed_tokens.table
    table = model.lm_head.qweight
    assert weight_int8.weight_bytes(model) < sum(
        t.numel() * t.element_size() for t in model.state_dict().values()) - table.numel() + 1


def test_engine_serves_an_int8_model() -> None:
    engine = tiny_engine(weight_int8.quantize_model(tiny_llama(BF16), BF16))
    for i in range(3):  # batch of three, then one alone
        engine.add_request(EngineRequest(f"r{i}", [1, 5 + i, 9, 30],
                                         SamplingParams(max_tokens=6, temperature=0.0,
                                                        ignore_eos=True)))
    counts: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            counts[out.id] = counts.get(out.id, 0) + len(out.new_token_ids)
    assert counts == {"r0": 6, "r1": 6, "r2": 6}


@pytest.mark.parametrize("tied", [False, True])
def test_prepared_checkpoint_round_trip(tmp_path: Path, tied: bool) -> None:
    source = tmp_path / "tiny"
    original = _tied_llama() if tied else tiny_llama(BF16)
    original.save_pretrained(source)
    (source / "tokenizer.json").write_text("{}")
    from transformers import AutoModelForCausalLM  # as the loader quantizes at load

    reloaded = AutoModelForCausalLM.from_pretrained(source, dtype=BF16).eval()
    quantized = weight_int8.quantize_model(reloaded, BF16)
    target = save_quantized(quantized, source, tmp_path / "tiny-int8-torch",
                            weight_int8.MODE, BF16)
    assert prepared_mode(target) == (weight_int8.MODE, "bfloat16")
    assert prepared_mode(source) is None
    assert (target / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    loaded, dtype = load_quantized(target, torch.device("cpu"))
    assert dtype == BF16
    assert (loaded.lm_head is loaded.model.embed_tokens.table) == tied
    ids = [1, 5, 9, 30, 41, 7]
    assert torch.equal(_logits(loaded, ids), _logits(quantized, ids))
    on_disk = (target / "model.safetensors").stat().st_size
    assert on_disk < 0.6 * (source / "model.safetensors").stat().st_size


def test_load_quantized_refuses_a_plain_checkpoint(tmp_path: Path) -> None:
    tiny_llama(BF16).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a pre-quantized"):
        load_quantized(tmp_path, torch.device("cpu"))


# --- auto -----------------------------------------------------------------------------------
CPU_BF16 = Capabilities("cpu", BF16, "AVX512")
GOOD = Quality(perplexity_increase=0.005, greedy_agreement=0.9)
BAD = Quality(perplexity_increase=0.30, greedy_agreement=0.2)


def test_auto_picks_the_fastest_mode_within_the_quality_bound() -> None:
    choice = choose_quantization(CPU_BF16, {"a": 1.3, "b": 1.6, "c": 2.0},
                                 quality={"a": GOOD, "b": GOOD, "c": BAD})
    assert choice.mode == "b"
    assert "1.60x" in choice.reason and "AVX512" in choice.reason


def test_auto_keeps_none_when_no_mode_is_faster() -> None:
    choice = choose_quantization(CPU_BF16, {"a": MIN_SPEEDUP - 0.01, "c": 3.0},
                                 quality={"a": GOOD, "c": BAD})
    assert choice.mode == "none"
    assert "a: " in choice.reason and "perplexity" in choice.reason


def test_auto_keeps_none_when_nothing_was_measured() -> None:
    assert choose_quantization(CPU_BF16, {"a": 2.0}, quality={}).mode == "none"
    assert choose_quantization(CPU_BF16, {}, quality={}).mode == "none"


def test_only_cpu_with_reduced_precision_probes_int8() -> None:
    def timer(fn: object) -> float:
        return 1.0

    assert candidate_speedups(Capabilities("cuda", BF16), [(64, 32)], timer) == {}
    assert candidate_speedups(Capabilities("cpu", torch.float32, "AVX2"), [(64, 32)],
                              timer) == {}
    assert candidate_speedups(CPU_BF16, [(64, 32)], timer) == {weight_int8.MODE: 1.0}


def test_probe_ratio_is_base_over_quantized_time() -> None:
    calls: list[int] = []

    def timer(fn: object) -> float:
        calls.append(1)
        return 2.0 if len(calls) % 2 else 1.0  # the unquantized matmul first, then int8

    assert candidate_speedups(CPU_BF16, [(64, 32), (32, 64)], timer) == {weight_int8.MODE: 2.0}


def test_an_explicit_mode_is_used_as_set(tmp_path: Path) -> None:
    settings = Settings(quantization="nf4", model_dir=tmp_path)
    choice = pick_quantization(settings, torch.device("cpu"), BF16, tmp_path)
    assert choice.mode == "nf4"


def test_int8_modules_run_single_rows_unpadded() -> None:
    """model_runner pads 1-3 row matmuls to 4 rows for batch-invariant rounding; int8pack's
    cost grows with rows, so int8 modules (and the MLPs made of them) skip the padding."""
    from worker.engine.model_runner import TransformerRunner

    model = weight_int8.quantize_model(_tied_llama(), BF16)
    layer = model.model.layers[0]
    assert layer.mlp.unpadded_rows and layer.self_attn.q_proj.unpadded_rows
    seen: list[int] = []

    def spy(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])

    hooks = [m.register_forward_pre_hook(spy) for m in model.modules()
             if isinstance(m, weight_int8.Int8Linear)]
    runner = TransformerRunner(model)
    runner.cache.ensure_capacity(1, 8)
    runner.cache.allocate("a")
    runner.decode([5], [0])
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {1}
