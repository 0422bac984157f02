"""``TOKENFLEET_QUANTIZATION=auto``: the fastest mode, on this device and CPU, whose quality
loss stays under a stated bound; ``none`` unless a quantized mode is faster at batch 1.

Quality is a property of the mode and the model, measured offline by ``python -m bench.quant``
(bench/data/quant_quality.json, docs/benchmarks.md) and kept in ``MEASURED_QUALITY``. Speed is
a property of the machine, so the candidate that can pay is probed here at load (about 0.1 s):
the model's MLP projections as a single-request decode step runs them, int8 weights against
the unquantized compute dtype.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine import weight_int8

# A mode may raise perplexity on bench/data/perplexity.txt by at most this fraction.
MAX_PERPLEXITY_INCREASE = 0.02
# ... and must be at least this much faster than the unquantized dtype at batch 1.
MIN_SPEEDUP = 1.05
# model_runner pads unquantized matmuls of 1-3 rows to this many (batch-invariant rounding)
PADDED_ROWS = 4


@dataclass(frozen=True, slots=True)
class Quality:
    """Against the unquantized model in the same compute dtype."""

    perplexity_increase: float  # (ppl_mode / ppl_none) - 1
    greedy_agreement: float  # share of greedy tokens equal to the unquantized model's


# (model directory name, compute dtype) -> mode -> quality against ``none`` in that dtype.
# Derived by ``quality_from_report`` from bench/data/quant_quality.json, written by
# ``python -m bench.quant --out bench/data/quant_quality.json`` (its command and machine are
# in the file); tests/unit/test_quant_choice_data.py fails if the two disagree. (The worker
# image does not ship bench/, hence the copy.) A model or mode missing here has no measured
# quality, and ``auto`` does not pick it.
MEASURED_QUALITY: dict[tuple[str, str], dict[str, Quality]] = {
    ("SmolLM2-135M-Instruct", "bfloat16"): {
        "int8-torch": Quality(perplexity_increase=0.0008, greedy_agreement=0.8906),
        "int8": Quality(perplexity_increase=0.0130, greedy_agreement=0.5859),
        "nf4": Quality(perplexity_increase=0.1893, greedy_agreement=0.1875),
    },
}


def quality_from_report(report: Mapping[str, Any],
                        ) -> dict[tuple[str, str], dict[str, Quality]]:
    """The quality entries a ``bench.quant --out`` report supports: each quantized mode's
    perplexity against ``none`` run in the same dtype, and its greedy agreement (against
    the report's first mode, which is ``none``), rounded to 4 digits."""
    modes = [m for m in report["modes"] if m.get("perplexity")]
    out: dict[tuple[str, str], dict[str, Quality]] = {}
    for ref in (m for m in modes if m["mode"] == "none"):
        entry: dict[str, Quality] = {}
        for m in modes:
            if m["mode"].startswith("none") or m["dtype"] != ref["dtype"]:
                continue
            entry[m["mode"]] = Quality(round(m["perplexity"] / ref["perplexity"] - 1, 4),
                                       round(float(m["agreement"] or 0.0), 4))
        out[(str(report["model"]), str(ref["dtype"]))] = entry
    return out


def measured_quality(model: str, compute_dtype: torch.dtype) -> dict[str, Quality]:
    return MEASURED_QUALITY.get((model, str(compute_dtype).removeprefix("torch.")), {})


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
                        quality: Mapping[str, Quality],
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
    return Choice(mode, f"on {where} {mode}'s single-request matmuls run {speedup:.2f}x the "
                        f"speed of {dtype}'s, perplexity +{loss.perplexity_increase:.1%} (bound "
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
        # what a single-request decode step runs: the unquantized matmul padded to the
        # runner's minimum rows (model_runner._apply), int8pack on the one row
        x = torch.randn(PADDED_ROWS, in_features).to(caps.compute_dtype)
        base += timer(lambda w=w, x=x: F.linear(x, w))
        one = x[:1].contiguous()
        quant += timer(lambda q=q, s=scale, x=one: torch.ops.aten._weight_int8pack_mm(x, q, s))
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
