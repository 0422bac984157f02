"""A decode step's pointwise work in four C calls a layer instead of ~25 torch operations.

Between its matmuls a Llama layer runs RMSNorm twice (cast up, square, mean, add, rsqrt,
multiply, cast down, multiply by the weight: eight operations), the rotary embedding on the
queries and keys (two slices, a negation, a concatenation, two products, a sum), two residual
additions and the gated activation (SiLU, then a product). In bf16 each of those is a torch
operation that converts its operands to fp32 and back, and at decode's few rows each costs
its dispatch more than its arithmetic: ~55 us a norm and ~70 us the activation at 32 rows
(SmolLM2), ~20 ms of an ~85 ms step over 30 layers. Here each group is one call:

- ``norm(x, w)``: RMSNorm as transformers' ``LlamaRMSNorm`` computes it (the mean square in
  fp32, ``1 / sqrt(var + eps)``, the product rounded to the model's dtype, then times the
  weight, rounded again);
- ``add_norm(h, delta, w)``: the residual sum ``h + delta`` (rounded) and its norm, both;
- ``rope(qkv, cos, sin, heads, kv_heads)``: a fused q/k/v projection split into contiguous
  queries, keys and values (what the attention and the cache writes read without another
  copy), the queries and keys rotated (``x cos + rotate_half(x) sin``, each product and the
  sum rounded as torch's three bf16 operations round them);
- ``silu_mul(gate_up)``: ``silu(gate) * up`` over a fused gate/up projection, each rounded.

Exactness: the rotary embedding and the residual sums are bitwise torch's. A norm's mean
square is summed in another order than torch's reduction (16 lanes, then a tree), and SiLU's
exponential is Cephes' polynomial (~1 ulp) where torch calls Sleef's: each can move a result
by one unit in the last place of fp32, which changes its bf16 rounding about once in 65,536.
The native attention kernel (native_attention.py) already differs from torch in the same way;
both are per row, so batch invariance holds. Rows are split across OpenMP threads only when
a call has more than ``_PARALLEL_ELEMENTS`` values (prefill chunks); a decode step's calls
run on the calling thread, with no parallel region to wait at.

Built like the attention kernel (``native_build``, ``-O3 -march=native -fopenmp``, and
``-ffp-contract=off`` so no product and sum fuse into an FMA that torch does not use).
``TOKENFLEET_POINTWISE=auto`` (default) uses it on CPU where it builds and a functional check
against the model's own modules passes; ``native`` warns where it cannot; ``torch`` never.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.engine import native_build

if TYPE_CHECKING:
    from worker.engine.model_runner import TransformerRunner

log = logging.getLogger(__name__)

_PARALLEL_ELEMENTS = 1 << 17
# the activation's exponential and division cost ~1.5 ns a value on one core: split from
# torch's own grain (32,768 values), as torch splits its SiLU
_SILU_PARALLEL_ELEMENTS = 1 << 15

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define PARALLEL_ELEMENTS @PARALLEL@
#define SILU_PARALLEL_ELEMENTS @SILU_PARALLEL@
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu32 __attribute__((vector_size(LANES * 4)));
typedef uint16_t vu16 __attribute__((vector_size(LANES * 2)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

static inline float bf2f(uint16_t x) {
    union { uint32_t u; float f; } c; c.u = (uint32_t)x << 16; return c.f;
}
static inline uint16_t f2bf(float f) {  /* round to nearest even, NaN kept quiet (torch's) */
    union { uint32_t u; float f; } c; c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}
static inline float round_bf16(float x) { return bf2f(f2bf(x)); }
static inline float same(float x) { return x; }
static inline float load1_bf16(const uint16_t* p) { return bf2f(*p); }
static inline float load1_f32(const float* p) { return *p; }
static inline void store1_bf16(uint16_t* p, float x) { *p = f2bf(x); }
static inline void store1_f32(float* p, float x) { *p = x; }

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
/* AVX-512: one widening move each way (gcc splits the generic conversions in halves) */
static inline vf load_bf16(const uint16_t* p) {
    __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)),
                                  16);
    return (vf)_mm512_castsi512_ps(w);
}
#define NARROW(u) ((vu16)_mm512_cvtepi32_epi16((__m512i)(u)))
#else
static inline vf load_bf16(const uint16_t* p) {
    vu16 h; memcpy(&h, p, sizeof h);
    vu32 w = __builtin_convertvector(h, vu32) << 16;
    vf out; memcpy(&out, &w, sizeof out); return out;
}
#define NARROW(u) __builtin_convertvector((u), vu16)
#endif
static inline vf load_f32(const float* p) { vf out; memcpy(&out, p, sizeof out); return out; }
static inline vu32 bf16_bits(vf x) {  /* f2bf of each lane, in the low 16 bits */
    vu32 u; memcpy(&u, &x, sizeof u);
    vu32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu32 nan = (vu32)((u & 0x7fffffffu) > 0x7f800000u);
    return (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
}
static inline vf round_bf16v(vf x) {
    vu32 w = bf16_bits(x) << 16; vf out; memcpy(&out, &w, sizeof out); return out;
}
static inline vf samev(vf x) { return x; }
static inline void store_bf16(uint16_t* p, vf x) {
    vu16 h = NARROW(bf16_bits(x)); memcpy(p, &h, sizeof h);
}
static inline void store_f32(float* p, vf x) { memcpy(p, &x, sizeof x); }
static inline float hsum(vf x) {  /* a tree: 16 -> 8 -> 4 -> 2 -> 1 */
    vf8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7)
          + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}
@EXP_CLAMPED@
/* e^x for any x: Cephes' expf (x = n ln2 + r, a degree-7 polynomial for e^r, 2^n added to
   the exponent bits), ~1 ulp. Below -86: e^-86 (what 1 + e^x cannot tell from 0); above
   88.72: infinity; (88, 88.72]: e^88 (a SiLU input below -88 is 0 either way). */
static inline vf vexp(vf x) {
    vi over = x > 88.72283935546875f;
    const vf lo = (vf){0} + -86.0f, hi = (vf){0} + 88.0f;
    vi below = x < lo, above = x > hi;
    x = (vf)(((vi)x & ~below) | ((vi)lo & below));
    x = (vf)(((vi)x & ~above) | ((vi)hi & above));
    return (vf)(((vi)exp_clamped(x) & ~over) | ((vi)((vf){0} + INFINITY) & over));
}

/* Norm of one row already in fp32 (``hs``, dim values): out = w * round(hs / sqrt(mean(hs^2)
   + eps)), rounded. */
#define NORM_ROW(T, LOAD, LOAD1, STORE, STORE1, ROUNDV, ROUND1)                                \
    {                                                                                          \
        vf acc = (vf){0};                                                                      \
        int i = 0;                                                                             \
        for (; i + LANES <= dim; i += LANES) { vf v = load_f32(hs + i); acc += v * v; }        \
        float ss = hsum(acc);                                                                  \
        for (; i < dim; i++) ss += hs[i] * hs[i];                                              \
        float r = 1.0f / sqrtf(ss / (float)dim + eps);                                         \
        for (i = 0; i + LANES <= dim; i += LANES)                                              \
            STORE(o + i, LOAD(w + i) * ROUNDV(load_f32(hs + i) * r));                          \
        for (; i < dim; i++) STORE1(o + i, LOAD1(w + i) * ROUND1(hs[i] * r));                  \
    }

/* NAME_norm(x, w, out, n, dim, eps); NAME_add_norm(h, d, w, hout, out, n, dim, eps):
   hout = round(h + d), out = norm(hout). Rows of dim values, contiguous. dim <= 16384. */
#define DEFINE_NORMS(NAME, T, LOAD, LOAD1, STORE, STORE1, ROUNDV, ROUND1)                      \
void NAME##_norm(const T* x, const T* w, T* out, int n, int dim, float eps) {                  \
    _Pragma("omp parallel for if((int64_t)n * dim > PARALLEL_ELEMENTS)")                       \
    for (int row = 0; row < n; row++) {                                                        \
        float hs[16384];                                                                       \
        const T* xr = x + (int64_t)row * dim; T* o = out + (int64_t)row * dim;                 \
        int i = 0;                                                                             \
        for (; i + LANES <= dim; i += LANES) store_f32(hs + i, LOAD(xr + i));                  \
        for (; i < dim; i++) hs[i] = LOAD1(xr + i);                                            \
        NORM_ROW(T, LOAD, LOAD1, STORE, STORE1, ROUNDV, ROUND1)                                \
    }                                                                                          \
}                                                                                              \
void NAME##_add_norm(const T* h, const T* d, const T* w, T* hout, T* out, int n, int dim,      \
                     float eps) {                                                              \
    _Pragma("omp parallel for if((int64_t)n * dim > PARALLEL_ELEMENTS)")                       \
    for (int row = 0; row < n; row++) {                                                        \
        float hs[16384];                                                                       \
        int64_t base = (int64_t)row * dim;                                                     \
        T* o = out + base; T* ho = hout + base;                                                \
        int i = 0;                                                                             \
        for (; i + LANES <= dim; i += LANES) {                                                 \
            vf s = ROUNDV(LOAD(h + base + i) + LOAD(d + base + i));                            \
            store_f32(hs + i, s); STORE(ho + i, s);                                            \
        }                                                                                      \
        for (; i < dim; i++) {                                                                 \
            hs[i] = ROUND1(LOAD1(h + base + i) + LOAD1(d + base + i)); STORE1(ho + i, hs[i]);  \
        }                                                                                      \
        NORM_ROW(T, LOAD, LOAD1, STORE, STORE1, ROUNDV, ROUND1)                                \
    }                                                                                          \
}

/* NAME_rope(qkv, cos, sin, q, k, v, n, H, KV, D): token t's fused projection qkv[t]
   ([H + 2 KV, D]) split into q[t] ([H, D]) and k[t] ([KV, D]), rotated with cos[t], sin[t]
   ([D]): round(round(x cos) + round(rot sin)), rot = (-x[D/2:], x[:D/2]); and v[t]
   ([KV, D]), copied. D even. */
#define DEFINE_ROPE(NAME, T, LOAD, LOAD1, STORE, STORE1, ROUNDV, ROUND1)                       \
void NAME##_rope(const T* qkv, const T* cos_, const T* sin_, T* q, T* k, T* v, int n, int H,   \
                 int KV, int D) {                                                              \
    int half = D / 2, width = H + 2 * KV;                                                      \
    _Pragma("omp parallel for if((int64_t)n * width * D > PARALLEL_ELEMENTS)")                 \
    for (int t = 0; t < n; t++) {                                                              \
        const T* c = cos_ + (int64_t)t * D; const T* s = sin_ + (int64_t)t * D;                \
        for (int hd = 0; hd < H + KV; hd++) {                                                  \
            const T* x = qkv + ((int64_t)t * width + hd) * D;                                  \
            T* o = hd < H ? q + ((int64_t)t * H + hd) * D                                      \
                          : k + ((int64_t)t * KV + hd - H) * D;                                \
            if (half % LANES == 0) {                                                           \
                for (int i = 0; i < D; i += LANES) {                                           \
                    vf rot = i < half ? -LOAD(x + i + half) : LOAD(x + i - half);              \
                    STORE(o + i, ROUNDV(LOAD(x + i) * LOAD(c + i))                             \
                                 + ROUNDV(rot * LOAD(s + i)));                                 \
                }                                                                              \
                continue;                                                                      \
            }                                                                                  \
            for (int i = 0; i < D; i++) {                                                      \
                float rot = i < half ? -LOAD1(x + i + half) : LOAD1(x + i - half);             \
                STORE1(o + i, ROUND1(LOAD1(x + i) * LOAD1(c + i))                              \
                              + ROUND1(rot * LOAD1(s + i)));                                   \
            }                                                                                  \
        }                                                                                      \
        memcpy(v + (int64_t)t * KV * D, qkv + ((int64_t)t * width + H + KV) * D,               \
               sizeof(T) * KV * D);                                                            \
    }                                                                                          \
}

/* NAME_silu_mul(gu, out, n, inter): gu rows [gate (inter) | up (inter)];
   out = round(round(g / (1 + e^-g)) * u). */
#define DEFINE_SILU_MUL(NAME, T, LOAD, LOAD1, STORE, STORE1, ROUNDV, ROUND1)                   \
void NAME##_silu_mul(const T* gu, T* out, int n, int inter) {                                  \
    _Pragma("omp parallel for if((int64_t)n * inter >= SILU_PARALLEL_ELEMENTS)")               \
    for (int t = 0; t < n; t++) {                                                              \
        const T* g = gu + (int64_t)t * 2 * inter; const T* u = g + inter;                      \
        T* o = out + (int64_t)t * inter;                                                       \
        int i = 0;                                                                             \
        for (; i + LANES <= inter; i += LANES) {                                               \
            vf x = LOAD(g + i);                                                                \
            STORE(o + i, ROUNDV(x / (1.0f + vexp(-x))) * LOAD(u + i));                         \
        }                                                                                      \
        if (i < inter) {                                                                       \
            float gx[LANES] = {0}, ux[LANES] = {0};                                            \
            for (int j = i; j < inter; j++) {                                                  \
                gx[j - i] = LOAD1(g + j); ux[j - i] = LOAD1(u + j);                            \
            }                                                                                  \
            vf x = load_f32(gx);                                                               \
            vf y = ROUNDV(x / (1.0f + vexp(-x))) * load_f32(ux);                               \
            for (int j = i; j < inter; j++) STORE1(o + j, y[j - i]);                           \
        }                                                                                      \
    }                                                                                          \
}

DEFINE_NORMS(bf16, uint16_t, load_bf16, load1_bf16, store_bf16, store1_bf16, round_bf16v,
             round_bf16)
DEFINE_NORMS(f32, float, load_f32, load1_f32, store_f32, store1_f32, samev, same)
DEFINE_ROPE(bf16, uint16_t, load_bf16, load1_bf16, store_bf16, store1_bf16, round_bf16v,
            round_bf16)
DEFINE_ROPE(f32, float, load_f32, load1_f32, store_f32, store1_f32, samev, same)
DEFINE_SILU_MUL(bf16, uint16_t, load_bf16, load1_bf16, store_bf16, store1_bf16, round_bf16v,
                round_bf16)
DEFINE_SILU_MUL(f32, float, load_f32, load1_f32, store_f32, store1_f32, samev, same)
""".replace("@PARALLEL@", str(_PARALLEL_ELEMENTS)).replace(
    "@EXP_CLAMPED@", native_build.EXP_CLAMPED_C).replace(
    "@SILU_PARALLEL@", str(_SILU_PARALLEL_ELEMENTS))
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC",
          "-std=gnu11"]
_MAX_DIM = 16384
_NAMES = {torch.bfloat16: "bf16", torch.float32: "f32"}


class NativePointwiseError(native_build.NativeBuildError):
    """The kernels cannot be built or loaded here; the message says why."""


def build(cache_dir: Path | None = None) -> Path:
    """The kernels' shared library (``native_build.build``); raises ``NativePointwiseError``."""
    return native_build.build("pointwise", _SOURCE, _FLAGS, cache_dir, NativePointwiseError)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class NativePointwise:
    """The four calls (module docstring); tensors contiguous, on CPU, in bf16 or fp32."""

    def __init__(self, path: Path) -> None:
        lib = native_build.open_library(path, NativePointwiseError)
        ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        for dtype, name in _NAMES.items():
            for op, args in (("norm", [ptr] * 3 + [i32] * 2 + [f32]),
                             ("add_norm", [ptr] * 5 + [i32] * 2 + [f32]),
                             ("rope", [ptr] * 6 + [i32] * 4),
                             ("silu_mul", [ptr] * 2 + [i32] * 2)):
                fn = getattr(lib, f"{name}_{op}")
                fn.argtypes, fn.restype = args, None
                self._fns[(op, dtype)] = fn
        self.path = path

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of each row of ``x [n, dim]`` (contiguous) with ``weight [dim]``."""
        out = torch.empty_like(x)
        self._fns[("norm", x.dtype)](_ptr(x), _ptr(weight), _ptr(out), x.shape[0], x.shape[1],
                                     eps)
        return out

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h + delta, norm(h + delta))`` for rows ``[n, dim]``."""
        h_out, out = torch.empty_like(h), torch.empty_like(h)
        self._fns[("add_norm", h.dtype)](_ptr(h), _ptr(delta), _ptr(weight), _ptr(h_out),
                                         _ptr(out), h.shape[0], h.shape[1], eps)
        return h_out, out

    def rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
             kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fused projection ``qkv [n, heads + 2 kv_heads, D]`` split into contiguous
        ``q [n, heads, D]`` and ``k``, ``v [n, kv_heads, D]``, q and k rotated; ``cos``/``sin``
        ``[n, D]`` (or ``[n, 1, D]``)."""
        n, width, dim = qkv.shape
        if width != heads + 2 * kv_heads:
            raise ValueError(f"qkv has {width} heads, not {heads} + 2 x {kv_heads}")
        q = torch.empty(n, heads, dim, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(n, kv_heads, dim, dtype=qkv.dtype, device=qkv.device)
        v = torch.empty(n, kv_heads, dim, dtype=qkv.dtype, device=qkv.device)
        self._fns[("rope", qkv.dtype)](_ptr(qkv), _ptr(cos), _ptr(sin), _ptr(q), _ptr(k),
                                       _ptr(v), n, heads, kv_heads, dim)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of rows ``[gate | up]`` (``[n, 2 x inter]``), ``[n, inter]``."""
        n, both = gate_up.shape
        out = torch.empty(n, both // 2, dtype=gate_up.dtype, device=gate_up.device)
        self._fns[("silu_mul", gate_up.dtype)](_ptr(gate_up), _ptr(out), n, both // 2)
        return out


def load(cache_dir: Path | None = None) -> NativePointwise:
    """Build (or find) and load the kernels; raises ``NativePointwiseError``."""
    return NativePointwise(build(cache_dir))


def _norm_eps(module: torch.nn.Module) -> float | None:
    """The epsilon of a Llama-style RMSNorm (``weight * normalized``), None for any other."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return eps


def _why_not(runner: TransformerRunner) -> str | None:
    if runner.device.type != "cpu":
        return f"it runs on CPU only (the model is on {runner.device.type})"
    if runner.dtype not in _NAMES:
        return f"dtype {runner.dtype} (bfloat16 and float32 only)"
    if runner.head_dim % 2:
        return f"odd head_dim {runner.head_dim}"
    if any(f is None for f in runner.fused):
        return "a layer is not a plain fused Llama layer (quantized or another MLP)"
    if any(hasattr(layer.self_attn, "q_norm") for layer in runner.layers):
        return "per-head query/key norms (Qwen3-style)"
    norms = [runner.final_norm, *(n for layer in runner.layers
                                  for n in (layer.input_layernorm,
                                            layer.post_attention_layernorm))]
    if any(_norm_eps(n) is None for n in norms):
        return "a norm that is not a Llama-style RMSNorm"
    if runner.hidden_size > _MAX_DIM:
        return f"hidden size {runner.hidden_size} (up to {_MAX_DIM})"
    return None


@torch.no_grad()
def _agrees(kernel: NativePointwise, runner: TransformerRunner) -> str | None:
    """Run each call once against the model's own modules on random rows; why not, or None.
    Guards against a norm class whose arithmetic is not ``LlamaRMSNorm``'s (Gemma's
    ``1 + weight``, another epsilon placement) passing the structural checks."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, runner.hidden_size, generator=gen).to(runner.dtype)
    for module in (runner.final_norm, runner.layers[0].input_layernorm):
        eps = _norm_eps(module)
        assert eps is not None
        got = kernel.norm(x, module.weight.detach().contiguous(), eps).float()
        want = module(x).float()
        tolerance = 1e-5 if runner.dtype == torch.float32 else 2e-2
        if not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
            return (f"the norm {type(module).__name__} does not compute what the kernel does "
                    f"(largest difference {float((got - want).abs().max()):.3g})")
    return None


def attach(runner: TransformerRunner, mode: str) -> bool:
    """Give ``runner`` the kernels for ``TOKENFLEET_POINTWISE=native`` or ``auto``; False (the
    torch operations; a warning saying why for ``native``, quietly for ``auto``) where it
    cannot: CUDA, a model whose layers are not plain Llama ones, no working compiler."""
    runner.pointwise = None
    if mode not in ("native", "auto"):
        return False
    level = logging.WARNING if mode == "native" else logging.INFO
    why = _why_not(runner)
    kernel = None
    if why is None:
        try:
            kernel = load()
        except NativePointwiseError as exc:
            why = str(exc)
    if kernel is not None and why is None:
        why = _agrees(kernel, runner)
    if why is not None or kernel is None:
        log.log(level, "TOKENFLEET_POINTWISE=%s: norms, rotary and activation stay torch: %s",
                mode, why)
        return False
    runner.pointwise = kernel
    log.info("norms, rotary and activation: native kernels %s", kernel.path.name)
    return True
