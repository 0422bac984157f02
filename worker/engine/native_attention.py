"""Attention over each query's own keys, read in place from the row KV cache (a C kernel).

The torch decode attention (``model_runner._decode_attention``) is two batched matmuls over
every row's whole ``len_cap`` buffer with a mask, so a short row pays for the longest, and
slicing rows to their lengths makes torch copy them first (docs/design/engine.md, "Decode
attention over padding"). This kernel reads, for each query, only the keys it sees: keys
``[0, length)`` of its row, for every KV head and its group of query heads at once (each key
and value is loaded once per group). OpenMP hands the (query, KV head) pairs to the cores two
at a time (dynamic: rows differ in length; 9% faster than a static split at batch 64)
(the process's one OpenMP runtime: torch's ``libgomp.so.1``).

Its numbers are the torch path's up to the summation order: in bf16 a score is rounded to
bf16 (what the bf16 ``bmm`` returns), scaled and softmaxed in fp32, the probabilities are
rounded to bf16 and the values summed in fp32, then rounded to bf16. A query's result never
depends on the other queries (batch invariance holds by construction) or on the buffer's
length (no padding is read).

Built once per machine with the C compiler (``cc -O3 -march=native -fopenmp``; gcc's vector
extensions, so AVX2 and AVX-512 machines each get their widest code) into
``~/.cache/tokenfleet/native/``; where there is no compiler or the build fails the worker
logs why and keeps the torch attention.
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

_SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu32 __attribute__((vector_size(LANES * 4)));
typedef uint16_t vu16 __attribute__((vector_size(LANES * 2)));
#define MAXG 16
#define MAXC 16 /* head_dim up to 256 */

static inline float bf2f(uint16_t x) {
    union { uint32_t u; float f; } c; c.u = (uint32_t)x << 16; return c.f;
}
static inline uint16_t f2bf(float f) {  /* round to nearest even, as torch does */
    union { uint32_t u; float f; } c; c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}
static inline vf load_bf16(const uint16_t* p) {
    vu16 h; memcpy(&h, p, sizeof h);
    vu32 w = __builtin_convertvector(h, vu32) << 16;
    vf out; memcpy(&out, &w, sizeof out); return out;
}
static inline vf load_f32(const float* p) { vf out; memcpy(&out, p, sizeof out); return out; }
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
static inline float hsum(vf x) {  /* a tree: 16 -> 8 -> 4 -> 2 -> 1 */
    vf8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7)
          + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}
/* hsum of four vectors at once, each summed in hsum's order (so a key's score is the same
   in a block of four as alone): 16 -> 8 -> 4 -> 2 -> 1 lanes, two or four vectors a shuffle. */
static inline vf4 hsum4(vf a, vf b, vf c, vf d) {
    vf ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
          + __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15,
                                    24, 25, 26, 27, 28, 29, 30, 31);
    vf cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
          + __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15,
                                    24, 25, 26, 27, 28, 29, 30, 31);
    vf x = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11,
                                   16, 17, 18, 19, 24, 25, 26, 27)
         + __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15,
                                   20, 21, 22, 23, 28, 29, 30, 31);
    vf8 e = __builtin_shufflevector(x, x, 0, 1, 4, 5, 8, 9, 12, 13)
          + __builtin_shufflevector(x, x, 2, 3, 6, 7, 10, 11, 14, 15);
    return __builtin_shufflevector(e, e, 0, 2, 4, 6) + __builtin_shufflevector(e, e, 1, 3, 5, 7);
}
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
@EXP_CLAMPED@
/* exp of LANES values at most 0 (a softmax's x - max): Cephes' expf (x = n ln2 + r, |r| <=
   ln2 / 2, a degree-7 polynomial for e^r, 2^n added to the exponent bits), ~1 ulp like
   libm's expf but 16 at a time. x below -86 gives e^-86 (4.5e-38, still a normal float),
   where expf would give a smaller one: nothing a softmax sum of at least 1 can see. */
static inline vf vexp(vf x) {
    const vf lo = (vf){0} + -86.0f;
    vi below = x < lo;
    x = (vf)(((vi)x & ~below) | ((vi)lo & below));
    return exp_clamped(x);
}
static inline float hmax(vf x) {
    float m = x[0];
    for (int i = 1; i < LANES; i++) m = x[i] > m ? x[i] : m;
    return m;
}
/* sg[0, len) <- exp(sg - max), returns their sum: LANES at a time, the tail through one
   more vector (its spare lanes not stored or summed). */
static inline float exp_shifted_sum(float* sg, int len) {
    vf mv = (vf){0} + -INFINITY;
    int j = 0;
    for (; j + LANES <= len; j += LANES) {
        vf x = load_f32(sg + j);
        vi gt = x > mv;
        mv = (vf)(((vi)x & gt) | ((vi)mv & ~gt));
    }
    float m = hmax(mv);
    for (int i = j; i < len; i++) m = sg[i] > m ? sg[i] : m;
    vf sv = (vf){0};
    for (j = 0; j + LANES <= len; j += LANES) {
        vf e = vexp(load_f32(sg + j) - m);
        memcpy(sg + j, &e, sizeof e);
        sv += e;
    }
    float tail = 0.f;
    if (j < len) {
        float t[LANES] = {0};
        for (int i = j; i < len; i++) t[i - j] = sg[i] - m;
        vf e = vexp(load_f32(t));
        for (int i = j; i < len; i++) { sg[i] = e[i - j]; tail += e[i - j]; }
    }
    return hsum(sv) + tail;
}

/* One (query, KV head) pair: its G query heads against keys [0, len) of cache row ``row``.
   ``s``: scratch of G x len floats. */
#define BODY(GG, DD, T, LOAD, STORE_SCORE, STORE_PROB, STORE_OUT)                                  \
    const T* qq = q + ((int64_t)n * KV * GG + (int64_t)h * GG) * DD;                               \
    const T* kb = k + ((int64_t)row * KV + h) * cap * DD;                                         \
    const T* vb = v + ((int64_t)row * KV + h) * cap * DD;                                         \
    int nc = DD / LANES;                                                                          \
    vf qv[MAXG][MAXC];                                                                           \
    for (int g = 0; g < GG; g++)                                                                  \
        for (int c = 0; c < nc; c++) qv[g][c] = LOAD(qq + g * DD + c * LANES);                    \
    int j = 0;                                                                                     \
    for (; j + 4 <= len; j += 4) {  /* four keys, their sums reduced together */                   \
        vf acc4[MAXG][4];                                                                          \
        for (int g = 0; g < GG; g++)                                                               \
            for (int t = 0; t < 4; t++) acc4[g][t] = (vf){0};                                      \
        for (int c = 0; c < nc; c++) {                                                             \
            for (int t = 0; t < 4; t++) {                                                          \
                vf kk = LOAD(kb + (int64_t)(j + t) * DD + c * LANES);                              \
                for (int g = 0; g < GG; g++) acc4[g][t] += qv[g][c] * kk;                          \
            }                                                                                      \
        }                                                                                          \
        for (int g = 0; g < GG; g++) {                                                             \
            vf4 r = hsum4(acc4[g][0], acc4[g][1], acc4[g][2], acc4[g][3]);                         \
            for (int t = 0; t < 4; t++) s[g * len + j + t] = STORE_SCORE(r[t]) * scale;            \
        }                                                                                          \
    }                                                                                              \
    for (; j < len; j++) {                                                                         \
        vf acc[MAXG];                                                                              \
        for (int g = 0; g < GG; g++) acc[g] = (vf){0};                                             \
        for (int c = 0; c < nc; c++) {                                                             \
            vf kk = LOAD(kb + (int64_t)j * DD + c * LANES);                                        \
            for (int g = 0; g < GG; g++) acc[g] += qv[g][c] * kk;                                  \
        }                                                                                          \
        for (int g = 0; g < GG; g++) s[g * len + j] = STORE_SCORE(hsum(acc[g])) * scale;           \
    }                                                                                              \
    for (int g = 0; g < GG; g++) {                                                                \
        float* sg = s + g * len;                                                                 \
        float sum = exp_shifted_sum(sg, len);                                                    \
        for (int j = 0; j < len; j++) sg[j] = STORE_PROB(sg[j] / sum);                           \
    }                                                                                            \
    vf acc[MAXG][MAXC];                                                                          \
    for (int g = 0; g < GG; g++) for (int c = 0; c < nc; c++) acc[g][c] = (vf){0};                \
    for (int j = 0; j < len; j++) {                                                              \
        for (int c = 0; c < nc; c++) {                                                           \
            vf vv = LOAD(vb + (int64_t)j * DD + c * LANES);                                       \
            for (int g = 0; g < GG; g++) acc[g][c] += s[g * len + j] * vv;                        \
        }                                                                                        \
    }                                                                                            \
    T* o = out + ((int64_t)n * KV * GG + (int64_t)h * GG) * DD;                                    \
    for (int g = 0; g < GG; g++) for (int c = 0; c < nc; c++) for (int i = 0; i < LANES; i++)   \
        o[g * DD + c * LANES + i] = STORE_OUT(acc[g][c][i]);

static inline float round_bf16(float x) { return bf2f(f2bf(x)); }
static inline float same(float x) { return x; }

/* NAME(q, k, v, rows, lens, out, N, KV, G, D, cap, scale): q, out [N, KV*G, D]; k, v
   [rows, KV, cap, D]; rows, lens [N]. Returns 0, or -1 when the shapes are beyond the
   kernel's limits (nothing written). */
#define DEFINE_ATTENTION(NAME, T, LOAD, STORE_SCORE, STORE_PROB, STORE_OUT)                      \
int NAME(const T* q, const T* k, const T* v, const int64_t* rows, const int64_t* lens, T* out,   \
         int N, int KV, int G, int D, int cap, float scale) {                                    \
    if (G > MAXG || D % LANES || D / LANES > MAXC) return -1;                                    \
    _Pragma("omp parallel")                                                                      \
    {                                                                                            \
        float* s = NULL; int have = 0;                                                           \
        _Pragma("omp for schedule(dynamic, 2)")                                                  \
        for (int64_t t = 0; t < (int64_t)N * KV; t++) {                                          \
            int n = (int)(t / KV), h = (int)(t % KV);                                            \
            int64_t row = rows[n]; int len = (int)lens[n];                                       \
            if (len > have) { free(s); s = (float*)malloc(sizeof(float) * G * len); have = len; } \
            if (G == 3 && D == 4 * LANES) {  /* SmolLM2's heads: constants, registers */       \
                BODY(3, 4 * LANES, T, LOAD, STORE_SCORE, STORE_PROB, STORE_OUT)                  \
            } else {                                                                             \
                BODY(G, D, T, LOAD, STORE_SCORE, STORE_PROB, STORE_OUT)                          \
            }                                                                                    \
        }                                                                                        \
        free(s);                                                                                 \
    }                                                                                            \
    return 0;                                                                                    \
}

DEFINE_ATTENTION(attention_bf16, uint16_t, load_bf16, round_bf16, round_bf16, f2bf)
DEFINE_ATTENTION(attention_f32, float, load_f32, same, same, same)
""".replace("@EXP_CLAMPED@", native_build.EXP_CLAMPED_C)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_LANES = 16
_MAX_GROUP = 16
_MAX_HEAD_DIM = 256


class NativeAttentionError(native_build.NativeBuildError):
    """The kernel cannot be built or loaded here; the message says why."""


def build(cache_dir: Path | None = None) -> Path:
    """The kernel's shared library (``native_build.build``); raises ``NativeAttentionError``."""
    return native_build.build("attention", _SOURCE, _FLAGS, cache_dir, NativeAttentionError)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


_loaded: list[NativeAttention] = []  # the kernel the custom op calls (every load: one code)


class NativeAttention:
    """``attend(q, keys, values, rows, lens, scale)`` through the compiled kernel."""

    def __init__(self, path: Path) -> None:
        lib = native_build.open_library(path, NativeAttentionError)
        args = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5 + [ctypes.c_float]
        self._fns = {torch.bfloat16: lib.attention_bf16, torch.float32: lib.attention_f32}
        for fn in self._fns.values():
            fn.argtypes, fn.restype = args, ctypes.c_int
        self.path = path
        _loaded[:] = [self]

    @staticmethod
    def supports(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int,
                 head_dim: int) -> str | None:
        """Why the kernel cannot serve this model, or None when it can."""
        if device.type != "cpu":
            return f"it runs on CPU only (the model is on {device.type})"
        if dtype not in (torch.bfloat16, torch.float32):
            return f"dtype {dtype} (bfloat16 and float32 only)"
        if head_dim % _LANES or head_dim > _MAX_HEAD_DIM:
            return f"head_dim {head_dim} (a multiple of {_LANES} up to {_MAX_HEAD_DIM})"
        if heads % kv_heads or heads // kv_heads > _MAX_GROUP:
            return f"{heads} query heads over {kv_heads} KV heads (groups up to {_MAX_GROUP})"
        return None

    @staticmethod
    def check_lens(lens: torch.Tensor, cap: int) -> None:
        """Raise unless every key length is in ``[1, cap]`` (what ``attend`` reads)."""
        if lens.numel() and (int(lens.min()) < 1 or int(lens.max()) > cap):
            raise ValueError(f"key lengths must be in [1, {cap}]")

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               rows: torch.Tensor, lens: torch.Tensor, scale: float,
               checked: bool = False) -> torch.Tensor:
        """``q [N, heads, D]`` (query ``n`` reads keys ``[0, lens[n])`` of cache row
        ``rows[n]``) against ``keys``/``values [rows, kv_heads, cap, D]``; ``[N, heads x D]``.
        ``checked``: the caller ran ``check_lens`` on these lengths and this ``cap`` (the
        runner does once a step, not once a layer)."""
        n, heads, dim = q.shape
        _, kv, cap, _ = keys.shape
        if not (keys.is_contiguous() and values.is_contiguous()):
            raise ValueError("the cache buffers must be contiguous")
        q = q.contiguous()
        rows = rows.to(torch.int64).contiguous()
        lens = lens.to(torch.int64).contiguous()
        if not checked:
            self.check_lens(lens, cap)
        out = torch.empty(n, heads * dim, dtype=q.dtype, device=q.device)
        status = self._fns[q.dtype](_ptr(q), _ptr(keys), _ptr(values), _ptr(rows), _ptr(lens),
                                    _ptr(out), n, kv, heads // kv, dim, cap, scale)
        if status != 0:
            raise ValueError(f"shape beyond the kernel: heads {heads}, kv {kv}, dim {dim}")
        return out


def load(cache_dir: Path | None = None) -> NativeAttention:
    """Build (or find) and load the kernel; raises ``NativeAttentionError``."""
    return NativeAttention(build(cache_dir))


@torch.library.custom_op("tokenfleet::native_attention", mutates_args=())
def native_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     rows: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``NativeAttention.attend`` as an opaque op, so the compiled decode layer
    (``compiled_step.py``, ``LayerSpec.native``) attends through the same kernel as eager
    decode: a request's tokens do not depend on which of its steps ran compiled. The body
    runs eagerly (a ctypes call) with the kernel loaded last."""
    if not _loaded:
        raise NativeAttentionError("tokenfleet::native_attention before the kernel is loaded")
    return _loaded[0].attend(q, keys, values, rows, lens, scale)


@native_attention.register_fake
def _native_attention_fake(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           rows: torch.Tensor, lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def attach(runner: TransformerRunner, mode: str) -> bool:
    """Give ``runner`` the native kernel for ``TOKENFLEET_ATTENTION=native`` or ``auto``;
    False (the torch attention, with a warning saying why for ``native``, quietly for
    ``auto``) where it cannot: a model or device the
    kernel does not cover, or no working compiler. With ``TOKENFLEET_COMPILE`` on, attach
    before the compiled step is built: ``CompiledDecode`` reads ``runner.native`` then and
    its graph attends through the same kernel (``tokenfleet::native_attention``)."""
    runner.native = None
    if mode not in ("native", "auto"):
        return False
    level = logging.WARNING if mode == "native" else logging.INFO  # auto: quietly torch
    why = NativeAttention.supports(runner.dtype, runner.device, runner.num_heads,
                                   runner.num_kv_heads, runner.head_dim)
    if why is None:
        try:
            runner.native = load()
        except NativeAttentionError as exc:
            why = str(exc)
    if why is not None:
        log.log(level, "TOKENFLEET_ATTENTION=%s: attention stays torch: %s", mode, why)
        return False
    log.info("decode attention: native kernel %s", runner.native.path.name)
    return True
