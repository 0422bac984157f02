"""``TOKENFLEET_QUANTIZATION=auto``: the fastest mode, on this device and CPU, whose quality
loss stays under a stated bound; ``none`` unless a quantized mode is faster at batch 1.

Quality is a property of the mode and the model, measured offline by ``tokenfleet bench
--systems quant`` (docs/benchmarks.md) and kept in ``MEASURED_QUALITY``. Speed is a property
of the machine, so the candidate that can pay is probed here at load (about 0.1 s): one of
the model's projections at two rows (what a single-request decode step runs), int8 weights
against the unquantized compute dtype.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine import weight_int8

# A mode may raise perplexity on bench/data/perplexity.txt by at most this fraction.
MAX_PERPLEXITY_INCREASE = 0.02
# ... and must be at least this much faster than the unquantized dtype at batch 1.
MIN_SPEEDUP = 1.05


@dataclass(frozen=True, slots=True)
class Quality:
    """Against the unquantized model in the same compute dtype."""

    perplexity_increase: float  # (ppl_mode / ppl_none) - 1
    greedy_agreement: float  # share of greedy tokens equal to the unquantized model's


# SmolLM2-135M-Instruct, bf16 compute, `tokenfleet bench --systems quant` (docs/benchmarks.md).
# A mode missing here has no measured quality, and `auto` does not pick it.
MEASURED_QUALITY: dict[str, Quality] = {}


@dataclass(frozen=True, slots=True)
class Capabilities:
    device: str  # "cpu" | "cuda"
    compute_dtype: torch.dtype  # what the unquantized model would run in
    cpu_capability: str = "unknown"  # torch's CPU dispatch level ("AVX2", "AVX512", ...)


@dataclass(frozen=True, slots=True)
class Choice:
    mode: str
    reason: str


def choose_quantization(caps: Capabilities, speedups: Mapping[str, float],
                        quality: Mapping[str, Quality] = MEASURED_QUALITY,
                        max_perplexity_increase: float = MAX_PERPLEXITY_INCREASE) -> Choice:
    """The fastest mode with ``speedups[mode] >= MIN_SPEEDUP`` (batch-1 speed against the
    unquantized ``compute_dtype``; a mode missing there was not measured) whose measured
    perplexity increase is within the bound; ``none`` with the reason otherwise."""
    dtype = str(caps.compute_dtype).removeprefix("torch.")
    where = f"{caps.device} ({caps.cpu_capability}, {dtype} compute)" if caps.device == "cpu" \
        else f"{caps.device} ({dtype})"
    rejected: list[str] = []
    best: tuple[float, str] | None = None
    for mode, speedup in sorted(speedups.items()):
        loss = quality.get(mode)
        if loss is None:
            rejected.append(f"{mode}: quality not measured")
        elif loss.perplexity_increase > max_perplexity_increase:
            rejected.append(f"{mode}: perplexity +{loss.perplexity_increase:.1%} > "
                            f"+{max_perplexity_increase:.0%}")
        elif speedup < MIN_SPEEDUP:
            rejected.append(f"{mode}: {speedup:.2f}x the speed of {dtype} at batch 1")
        elif best is None or speedup > best[0]:
            best = (speedup, mode)
    if best is None:
        detail = "; ".join(rejected) if rejected else "no quantized mode runs here"
        return Choice("none", f"on {where} no quantized mode pays: {detail}")
    speedup, mode = best
    loss = quality[mode]
    return Choice(mode, f"on {where} {mode} runs {speedup:.2f}x the speed of {dtype} at "
                        f"batch 1, perplexity +{loss.perplexity_increase:.1%} (bound "
                        f"+{max_perplexity_increase:.0%}), greedy agreement "
                        f"{loss.greedy_agreement:.0%}")


def candidate_speedups(caps: Capabilities, shapes: list[tuple[int, int]],
                       timer: Callable[[Callable[[], object]], float] | None = None,
                       ) -> dict[str, float]:
    """Batch-1 speed of each mode that can pay here, over the unquantized dtype.

    bitsandbytes is not probed on CPU: its CPU kernels measured 0.01-0.3x of bf16 at batch 1
    on both an AVX-512 and an AVX2 machine (docs/benchmarks.md). On CUDA nothing was measured
    here, so nothing is offered and ``auto`` keeps ``none``. Weight-only int8 only pays with a
    reduced-precision compute dtype (its fp32 kernel is slower than an fp32 matmul)."""
    if caps.device != "cpu" or caps.compute_dtype == torch.float32:
        return {}
    timer = timer or _best_time
    base = quant = 0.0
    for out_features, in_features in shapes:
        w = torch.randn(out_features, in_features).to(caps.compute_dtype)
        q, scale = weight_int8.quantize_rows(w, caps.compute_dtype)
        x = torch.randn(2, in_features).to(caps.compute_dtype)
        base += timer(lambda w=w, x=x: F.linear(x, w))
        quant += timer(lambda q=q, s=scale, x=x: torch.ops.aten._weight_int8pack_mm(x, q, s))
    return {weight_int8.MODE: base / quant} if quant > 0 else {}


def _best_time(fn: Callable[[], object], repeats: int = 15) -> float:
    """Fastest of ``repeats`` calls: the machine is shared, the minimum is the cost."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def model_shapes(config: object) -> list[tuple[int, int]]:
    """The projections a decode step spends most of its time in: the MLP's up and down."""
    hidden = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * hidden))
    return [(inter, hidden), (hidden, inter)]
