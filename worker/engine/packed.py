"""Linear weights pre-packed in oneDNN's blocked layout (bf16 and fp32 on CPU).

``F.linear`` on a bf16 CPU tensor already runs a oneDNN matmul, but it reorders the plain
``[out, in]`` weight into oneDNN's blocked layout on every call. Packing once at load
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing pass does) and
calling ``torch.ops.mkldnn._linear_pointwise`` skips that: measured on SmolLM2's shapes on
an AVX512-BF16 EPYC (docs/design/engine.md, "Where a decode step's time goes").

Where a weight is packed is checked on a probe at load, at a few row counts:
- bf16: only where the packed matmul gives bitwise the results ``F.linear`` gives (that is
  oneDNN too, reordering per call), so greedy tokens do not change;
- fp32: ``F.linear`` runs MKL, which the packed oneDNN kernel does not reproduce bitwise
  (~1e-6). It is packed where a row's result does not depend on how many rows the call has
  (batch invariance, which MKL itself lacks below 4 rows: the runner pads for it) and stays
  within 1e-4 of ``F.linear``. It pays most there: at batch 1 MKL streams fp32 weights at
  8-11 GB/s, oneDNN's packed kernel at 17-25 GB/s (SmolLM2's 30 layers, docs/design/engine.md).
The plain weight stays where it was (the model's own modules, a tied embedding); the packed
copy costs as much memory again.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_PROBE_ROWS = (1, 4, 7, 64)
_BATCH_HINT = 64  # the row count oneDNN picks its blocking for (results do not depend on it)


class PackedLinear:
    """``F.linear(x, weight, bias)`` with the weight packed once; ``x`` is ``[n, in]``."""

    __slots__ = ("bias", "out_features", "packed")

    def __init__(
        self,
        packed: torch.Tensor,
        bias: torch.Tensor | None,
        out_features: int,
    ) -> None:
        self.packed = packed
        self.bias = bias
        self.out_features = out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float32)
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> PackedLinear | None:
    """The packed form of ``weight`` (``[out, in]``), or None where packing is unavailable or
    would change a result (then the caller keeps ``F.linear``)."""
    if not can_pack(weight) or (bias is not None and bias.dtype != weight.dtype):
        return None
    try:
        with torch.inference_mode():
            linear = PackedLinear(
                torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT), bias, weight.shape[0]
            )
            if _agrees(linear, weight, bias):
                return linear
    except (RuntimeError, NotImplementedError) as exc:
        log.info("oneDNN weight packing unavailable: %r", exc)
        return None
    if weight.dtype == torch.float32:  # expected for some shapes (AVX-512: K = 1536)
        log.info("packed fp32 oneDNN matmul of %s depends on the row count here; left to "
                 "F.linear", tuple(weight.shape))
    else:
        log.warning("packed oneDNN matmul differs from F.linear here; weights left unpacked")
    return None


def _agrees(linear: PackedLinear, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(max(_PROBE_ROWS), weight.shape[1], generator=gen).to(weight.dtype)
    if weight.dtype != torch.float32:
        return all(
            torch.equal(linear(probe[:rows]), F.linear(probe[:rows], weight, bias))
            for rows in _PROBE_ROWS
        )
    full = linear(probe)
    return all(torch.equal(linear(probe[:rows]), full[:rows]) for rows in _PROBE_ROWS) and (
        torch.allclose(full, F.linear(probe, weight, bias), rtol=1e-4, atol=1e-4))
