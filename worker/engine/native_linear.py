"""fp32 linear layers through a C kernel whose rows do not depend on the row count.

On an AVX2-only CPU the engine runs fp32 (its bf16 is emulated), and a decode step is mostly
matmuls that stream the weights. torch's kernels there are oneDNN's packed fp32 matmul
(``packed.py``) and MKL (``F.linear``); neither gives a row the same rounding at 1-3 rows as
at 4 or more, so the runner pads a lone request's matmuls to 4 rows (``model_runner._apply``),
and at batch 1 the step computes four rows and streams the weights at oneDNN's 4-row rate.

This kernel computes every output ``out[m, n] = sum_k x[m, k] w[n, k]`` as one chain of
fused multiply-adds over ``k`` in order. That order does not depend on ``M`` or on how the
rows are blocked, so a row's result is bitwise the same at any row count (batch invariance
by construction, no padding). The weight is packed once into panels of 16 outputs
(``[N / 16, K, 16]``, a copy that replaces oneDNN's packed copy: the same memory); a block of
6 rows x 16 outputs keeps 12 accumulators in registers, loads each weight vector once per 6
rows and broadcasts each input once per 16 outputs (the classic outer-product micro-kernel);
OpenMP splits the panels between the cores.

Measured on the AVX2 EPYC (``python -m bench.linear_kernels``; docs/design/engine.md,
"Native fp32 linear"): SmolLM2's 30 layers and its tied head stream the weights at 32 GB/s
at 1 row, against oneDNN's 19 at the 4 rows the runner pads to, and reach 165 GFLOP/s at 64
rows against oneDNN's 117.

x86-64 with AVX2 and FMA only (``_mm256_fmadd_ps``); fp32, no bias, ``out`` a multiple of 16.
Built like the native attention (``native_build.py``).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.engine import native_build

if TYPE_CHECKING:
    from worker.engine.model_runner import TransformerRunner

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <immintrin.h>

#define MR 6 /* rows per block: 12 accumulators + 2 weight vectors + 1 broadcast input */

/* Rows [0, mr) of x against one panel of 16 outputs (wp[k][16]): out[r][j] += x[r][k] *
   wp[k][j] for k in order, one fused multiply-add chain per output. */
static inline __attribute__((always_inline)) void block(
        const float* x, const float* wp, float* out, int mr, int N, int K) {
    __m256 a0[MR], a1[MR];
    for (int r = 0; r < MR; r++) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }
    for (int k = 0; k < K; k++) {
        __m256 w0 = _mm256_loadu_ps(wp + (int64_t)k * 16);
        __m256 w1 = _mm256_loadu_ps(wp + (int64_t)k * 16 + 8);
        #pragma GCC unroll 6
        for (int r = 0; r < MR; r++) {
            if (r < mr) {
                __m256 xb = _mm256_broadcast_ss(x + (int64_t)r * K + k);
                a0[r] = _mm256_fmadd_ps(xb, w0, a0[r]);
                a1[r] = _mm256_fmadd_ps(xb, w1, a1[r]);
            }
        }
    }
    #pragma GCC unroll 6
    for (int r = 0; r < MR; r++) {
        if (r < mr) {
            _mm256_storeu_ps(out + (int64_t)r * N, a0[r]);
            _mm256_storeu_ps(out + (int64_t)r * N + 8, a1[r]);
        }
    }
}

/* out[M, N] = x[M, K] w[N, K]^T with w packed as panels wp[N / 16][K][16]. */
int linear_f32(const float* x, const float* wp, float* out, int M, int N, int K) {
    if (N % 16) return -1;
    int panels = N / 16;
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const float* pw = wp + (int64_t)p * K * 16;
        for (int m = 0; m < M; m += MR) {
            const float* xm = x + (int64_t)m * K;
            float* om = out + (int64_t)m * N + p * 16;
            switch (M - m < MR ? M - m : MR) {  /* a constant row count in each branch */
            case 6: block(xm, pw, om, 6, N, K); break;
            case 5: block(xm, pw, om, 5, N, K); break;
            case 4: block(xm, pw, om, 4, N, K); break;
            case 3: block(xm, pw, om, 3, N, K); break;
            case 2: block(xm, pw, om, 2, N, K); break;
            default: block(xm, pw, om, 1, N, K); break;
            }
        }
    }
    return 0;
}
"""
# -ffp-contract=off: the only fused multiply-adds are the explicit ones
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC",
          "-std=gnu11"]
_PANEL = 16  # outputs per panel of the packed weight


class NativeLinearError(native_build.NativeBuildError):
    """The kernel cannot be built or loaded here; the message says why."""


def build(cache_dir: Path | None = None) -> Path:
    return native_build.build("linear", _SOURCE, _FLAGS, cache_dir, NativeLinearError)


class Kernel:
    """The loaded library: ``linear(x, weight)``."""

    def __init__(self, path: Path) -> None:
        lib = native_build.open_library(path, NativeLinearError)
        self._fn = lib.linear_f32
        self._fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3
        self._fn.restype = ctypes.c_int
        self.path = path

    def linear(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight)`` for fp32 ``x [M, K]`` and ``packed = pack(weight)``."""
        x = x.contiguous()
        m, k = x.shape
        panels, k_packed, width = packed.shape
        if k != k_packed or width != _PANEL:
            raise ValueError(f"x has {k} features, the packed weight {k_packed}")
        out = torch.empty(m, panels * _PANEL, dtype=torch.float32)
        if m:
            self._fn(x.data_ptr(), packed.data_ptr(), out.data_ptr(), m, panels * _PANEL, k)
        return out


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` as panels of 16 outputs ``[N / 16, K, 16]`` (a copy: the kernel
    reads 16 outputs' weights for one input feature in one contiguous 64-byte run)."""
    n, k = weight.shape
    return weight.detach().reshape(n // _PANEL, _PANEL, k).transpose(1, 2).contiguous()


_loaded: list[Kernel] = []  # the kernel the custom op calls (every load: one code)


def load(cache_dir: Path | None = None) -> Kernel:
    """Build (or find) and load the kernel; raises ``NativeLinearError``."""
    kernel = Kernel(build(cache_dir))
    _loaded[:] = [kernel]
    return kernel


@torch.library.custom_op("tokenfleet::native_linear", mutates_args=())
def native_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``NativeLinear.__call__`` as an opaque op for the compiled decode layer
    (``compiled_step.py``, ``LayerSpec.native_linear``): its rows round as the eager step's."""
    if not _loaded:
        raise NativeLinearError("tokenfleet::native_linear before the kernel is loaded")
    return _loaded[0].linear(x, packed)


@native_linear.register_fake
def _native_linear_fake(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * packed.shape[2])


@dataclass(slots=True)
class NativeLinear:
    """``F.linear(x, weight)`` through the kernel; stands where a ``PackedLinear`` would
    (``packed``: the weight as the kernel's panels, ``bias`` always None)."""

    kernel: Kernel
    packed: torch.Tensor
    bias: None = None
    # model_runner._apply: a row rounds the same at any row count, so 1-3 rows run unpadded
    unpadded_rows: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.linear(x, self.packed)


def unsupported(weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the kernel cannot run this projection, or None when it can (the CPU is checked
    once, by ``cpu_unsupported``)."""
    if weight.device.type != "cpu":
        return f"it runs on CPU only (the model is on {weight.device.type})"
    if weight.dtype != torch.float32:
        return f"dtype {weight.dtype} (float32 only: the dtype of AVX2-only CPUs)"
    if bias is not None:
        return "a projection with a bias"
    if weight.dim() != 2 or weight.shape[0] % _PANEL:
        return f"weight shape {tuple(weight.shape)} (out_features a multiple of {_PANEL})"
    return None


def cpu_unsupported() -> str | None:
    """Why this CPU cannot run the kernel (no AVX2 and FMA), or None when it can."""
    flags = native_build.cpu_flags().split()
    if "avx2" not in flags or "fma" not in flags:
        return "a CPU without AVX2 and FMA"
    return None


def _why_not(runner: TransformerRunner) -> str | None:
    """Why the kernel cannot run every projection and the head of ``runner`` (None: it can).
    Quantized modules (``Int8Linear``, bitsandbytes) have no plain weight: not for it."""
    why = cpu_unsupported()
    if why is not None:
        return why
    modules = [("the head", runner.lm_head)]
    for i, layer in enumerate(runner.layers):
        modules += [(f"layer {i}'s o_proj", layer.self_attn.o_proj),
                    (f"layer {i}'s down_proj", layer.mlp.down_proj)]
    for name, module in modules:
        if type(module) is not torch.nn.Linear:
            return f"{name} is a {type(module).__name__}, not a plain Linear"
    fused = [f for f in runner.fused if f is not None]
    if len(fused) != len(runner.fused):
        return "a layer is not a plain fused Llama layer"
    pairs: list[tuple[torch.Tensor, torch.Tensor | None]] = [
        (module.weight, module.bias) for _, module in modules]
    pairs += [(f.qkv_weight, f.qkv_bias) for f in fused]
    pairs += [(f.gate_up_weight, None) for f in fused]
    return next((w for w in (unsupported(t, b) for t, b in pairs) if w is not None), None)


def attach(runner: TransformerRunner, mode: str) -> bool:
    """``TOKENFLEET_LINEAR=native``: every projection and the head of ``runner`` through the
    kernel (all or none: one compiled graph serves every layer), replacing their oneDNN
    packed copies; False, with a warning saying why, where any cannot be. ``auto``: the
    same for an fp32 model on a CPU that can run it (quietly torch's kernels elsewhere).
    Attach before the compiled step is built (it reads the projections then)."""
    if mode == "auto" and (runner.dtype != torch.float32 or runner.device.type != "cpu"
                           or cpu_unsupported() is not None):
        return False
    if mode not in ("native", "auto"):
        return False
    level = logging.WARNING if mode == "native" else logging.INFO
    why = _why_not(runner)
    if why is None:
        try:
            kernel = load()
        except NativeLinearError as exc:
            why = str(exc)
    if why is not None:
        log.log(level, "TOKENFLEET_LINEAR=%s: projections stay on torch's kernels: %s",
                mode, why)
        return False

    def native(weight: torch.Tensor) -> NativeLinear:
        return NativeLinear(kernel, pack(weight))

    runner.lm_head_packed = native(runner.lm_head.weight)
    for fused, layer in zip(runner.fused, runner.layers, strict=True):
        assert fused is not None
        fused.qkv_packed = native(fused.qkv_weight)
        fused.o_packed = native(layer.self_attn.o_proj.weight)
        fused.gate_up_packed = native(fused.gate_up_weight)
        fused.down_packed = native(layer.mlp.down_proj.weight)
    runner.rows_invariant = True  # every matmul's rows round alike at any row count
    runner.native_linear = True
    log.info("projections and head: native fp32 kernel %s", kernel.path.name)
    return True
