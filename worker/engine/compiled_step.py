"""A compiled pure-decode step (``TOKENFLEET_COMPILE=decode``): one inductor graph per layer.

Eager, a decode layer is ~45 small operators (norm, rotary, cache writes, casts, softmax,
SiLU) around four matmuls; at batch 1 their dispatch is about a third of the step. Here the
whole layer is one ``torch.compile``-d function that every layer calls with its own weights
(the same graph: one compile serves all layers), with dynamic batch and cache-length
dimensions, so the growing ``len_cap`` and any batch size reuse it. Pointwise work between
the matmuls is fused into a few C++ kernels; the matmuls stay the kernels eager calls,
projection by projection (qkv, o_proj, gate_up, down_proj: ``LayerSpec.packed``): packed
oneDNN weights go through ``tokenfleet::packed_linear`` (an opaque custom op, since
inductor lowers ``mkldnn._linear_pointwise`` only for its own frozen constants), plain
weights through ``F.linear`` (MKL, as eager). A layer may mix them (fp32 on AVX-512 keeps
down_proj on F.linear, packed.py); every layer must mix them alike (one graph for all).

What the compiled layer keeps from eager, so tokens do not depend on the path:
- rows ``0 .. B-1`` only: the cache is passed as the ``[:B]`` views of its buffers, so no
  write can reach a row ``>= B`` (such rows may be mid-prefill); there is no bucket padding;
- matmul inputs of fewer than 4 rows are padded as ``model_runner._apply`` pads them (a
  shape guard: batch 1, 2-3 and 4+ are separate graphs, all compiled at warm-up);
- bf16 intermediates are rounded where eager rounds them (``emulate_precision_casts``).
Prefill and mixed steps, the embedding and the lm_head stay eager.

``compile_warmup.py`` builds the graphs in a background thread while decode runs eager
(``TOKENFLEET_COMPILE_WARMUP``) and attaches them when all are ready.

Compiled artifacts go to inductor's on-disk caches under ``~/.cache/tokenfleet/inductor``
(``TORCHINDUCTOR_CACHE_DIR``), so a worker's second start loads them instead of compiling.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from worker.engine.model_runner import FusedWeights, TransformerRunner
    from worker.engine.native_linear import NativeLinear
    from worker.engine.packed import PackedLinear

log = logging.getLogger(__name__)

_MIN_ROWS = 4  # as model_runner._MIN_ROWS: matmuls never see fewer rows


@torch.library.custom_op("tokenfleet::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``PackedLinear.__call__`` as an op inductor calls as is (see the module doc)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_fake(x: torch.Tensor, packed: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tokenfleet" / "inductor"


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """The constants of a layer's graph (the same for every layer of a model)."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    eps_in: float
    eps_post: float
    packed: tuple[bool, bool, bool, bool]  # qkv, o, gate_up, down: oneDNN packed or F.linear
    dtype: torch.dtype
    native: bool = False  # attention through tokenfleet::native_attention (runner.native)
    # the projections through tokenfleet::native_linear (runner.native_linear): unpadded
    native_linear: bool = False


PROJECTIONS = ("qkv", "o_proj", "gate_up", "down_proj")


def _use_cache_dir(path: Path | None) -> Path:
    """Point inductor's on-disk caches at ``path``; None: ``~/.cache/tokenfleet/inductor``
    unless the user chose a directory with ``TORCHINDUCTOR_CACHE_DIR`` (torch itself sets
    the variable to its /tmp default once it has looked it up)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    if path is None:
        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current and os.path.abspath(current) != os.path.abspath(torch_default()):
            return Path(current)
        path = default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


class UnsupportedCompileError(ValueError):
    """The model's layers are not the plain shape the compiled layer implements."""


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm exactly as transformers writes it (fp32 statistics, then the cast)."""
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def _pad(x: torch.Tensor) -> torch.Tensor:
    """``model_runner._pad_rows(x, 4)`` for fewer than 4 rows; the pad is a fixed 3 rows cut
    back to 4, so batch 2 and 3 share one graph."""
    if x.shape[0] >= _MIN_ROWS:
        return x
    return torch.cat([x, x[:1].expand(_MIN_ROWS - 1, *x.shape[1:])])[:_MIN_ROWS]


def _make_layer(spec: LayerSpec) -> Callable[..., torch.Tensor]:
    heads, kv, dim = spec.heads, spec.kv_heads, spec.head_dim
    group = heads // kv

    def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
               packed: bool) -> torch.Tensor:
        if packed and spec.native_linear:  # rows round alike at any count: no padding
            return torch.ops.tokenfleet.native_linear(x, w)
        n = x.shape[0]
        xp = _pad(x)
        out = (torch.ops.tokenfleet.packed_linear(xp, w, bias) if packed
               else F.linear(xp, w, bias))
        return out[:n]

    qkv_packed, o_packed, gate_up_packed, down_packed = spec.packed

    def layer(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
              pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              w_in: torch.Tensor, w_post: torch.Tensor, qkv_w: torch.Tensor,
              qkv_b: torch.Tensor | None, o_w: torch.Tensor, o_b: torch.Tensor | None,
              gate_up_w: torch.Tensor, down_w: torch.Tensor,
              down_b: torch.Tensor | None) -> torch.Tensor:
        b, length = h.shape[0], keys.shape[2]
        x = _rms(h, w_in, spec.eps_in)
        qkv = linear(x, qkv_w, qkv_b, qkv_packed).view(b, heads + 2 * kv, dim)
        qk = qkv[:, :heads + kv]
        half = dim // 2
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        qk = qk * cos + rotated * sin
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv:]
        rows = torch.arange(b, device=h.device)  # rows >= b are never written (mid-prefill)
        keys[rows, :, pos] = k  # on the whole buffer: in place, no copy of it
        values[rows, :, pos] = v
        if spec.native:  # the eager native path's kernel: each row's own keys, in place
            attn = torch.ops.tokenfleet.native_attention(q, keys, values, rows, pos + 1,
                                                         spec.scale)
        else:
            kb = keys[:b].view(b * kv, length, dim)
            vb = values[:b].view(b * kv, length, dim)
            qb = q.reshape(b * kv, group, dim)
            scores = torch.bmm(qb, kb.transpose(1, 2)).float() * spec.scale + mask
            probs = torch.softmax(scores, dim=-1).to(spec.dtype)
            attn = torch.bmm(probs, vb).view(b, heads * dim)
        h = h + linear(attn, o_w, o_b, o_packed)
        x = _rms(h, w_post, spec.eps_post)
        gate, up = linear(x, gate_up_w, None, gate_up_packed).chunk(2, dim=-1)
        return h + linear(F.silu(gate) * up, down_w, down_b, down_packed)

    return layer


def _packed_linears(f: FusedWeights) -> tuple[PackedLinear | NativeLinear | None, ...]:
    return (f.qkv_packed, f.o_packed, f.gate_up_packed, f.down_packed)


def _packed_flags(f: FusedWeights) -> tuple[bool, bool, bool, bool]:
    qkv, o, gate_up, down = (p is not None for p in _packed_linears(f))
    return (qkv, o, gate_up, down)


def _describe(packed: tuple[bool, ...]) -> str:
    """``"packed: qkv, o_proj, gate_up; F.linear: down_proj"``."""
    on = [n for n, p in zip(PROJECTIONS, packed, strict=True) if p]
    off = [n for n, p in zip(PROJECTIONS, packed, strict=True) if not p]
    return "; ".join(part for part in (
        f"packed: {', '.join(on)}" if on else "", f"F.linear: {', '.join(off)}" if off else "")
        if part)


def _norm_eps(module: torch.nn.Module) -> float:
    """The epsilon of a Llama-style RMSNorm whose output ``_rms`` reproduces bitwise."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise UnsupportedCompileError(f"{type(module).__name__} is not a Llama RMSNorm")
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(4, weight.shape[0], generator=gen) * 3).to(weight)
    with torch.inference_mode():
        if not torch.equal(module(probe), _rms(probe, weight, float(eps))):
            raise UnsupportedCompileError(f"{type(module).__name__} is not a Llama RMSNorm")
    return float(eps)


class CompiledDecode:
    """The decode layers of a ``TransformerRunner`` through one compiled layer graph."""

    def __init__(self, runner: TransformerRunner, cache_dir: Path | None = None,
                 unroll: bool = False) -> None:
        fused = [f for f in runner.fused if f is not None]
        if len(fused) != len(runner.fused) or any(
                hasattr(layer.self_attn, "q_norm")
                or type(layer.self_attn.o_proj) is not torch.nn.Linear
                for layer in runner.layers):
            raise UnsupportedCompileError("only plain fused Llama layers are compiled")
        packed = _packed_flags(fused[0])
        for i, f in enumerate(fused):
            if _packed_flags(f) != packed:
                raise UnsupportedCompileError(
                    f"layer {i} runs {_describe(_packed_flags(f))}; layer 0 runs "
                    f"{_describe(packed)} (one graph serves every layer)")
        if not all(packed):
            log.info("compiled decode step: %s (a projection stays on F.linear where "
                     "packed.py's probe refused it; fp32 on AVX-512: down_proj, whose "
                     "packed results depend on the row count)", _describe(packed))
        first = runner.layers[0]
        self.spec = LayerSpec(
            heads=runner.num_heads, kv_heads=runner.num_kv_heads, head_dim=runner.head_dim,
            scale=runner.scale, eps_in=_norm_eps(first.input_layernorm),
            eps_post=_norm_eps(first.post_attention_layernorm), packed=packed,
            dtype=runner.dtype, native=runner.native is not None,
            native_linear=runner.native_linear)
        if self.spec.native_linear:  # native_linear.attach imported (registered) the op
            log.info("compiled decode step: projections through the native fp32 kernel "
                     "(TOKENFLEET_LINEAR=native)")
        if self.spec.native:
            import worker.engine.native_attention  # noqa: F401  (registers the custom op)

            log.info("compiled decode step: attention through the native kernel "
                     "(TOKENFLEET_ATTENTION=native)")
        for layer in runner.layers:
            if (_norm_eps(layer.input_layernorm), _norm_eps(layer.post_attention_layernorm)
                    ) != (self.spec.eps_in, self.spec.eps_post):
                raise UnsupportedCompileError("layers with different norm epsilons")
        self.runner = runner
        self.weights = [self._layer_weights(i) for i in range(len(runner.layers))]
        self.cache_dir = _use_cache_dir(cache_dir)
        self.unroll = unroll
        self.stance = "eager_on_recompile"  # serving never stalls on a compile (tests: fail)
        layer = _make_layer(self.spec)
        fn: Callable[..., torch.Tensor] = layer
        if unroll:
            num_layers = len(self.weights)

            def step(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     mask: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
                     values: list[torch.Tensor], weights: list[tuple[torch.Tensor | None, ...]],
                     ) -> torch.Tensor:
                for i in range(num_layers):
                    h = layer(h, cos, sin, mask, pos, keys[i], values[i], *weights[i])
                return h

            fn = step
        self.compiled = torch.compile(fn, dynamic=None, fullgraph=True,
                                      options={"emulate_precision_casts": True})

    def _layer_weights(self, i: int) -> tuple[torch.Tensor | None, ...]:
        """The layer graph's weight arguments: each projection's packed oneDNN weight where
        ``spec.packed`` says so, else the plain ``[out, in]`` weight (F.linear)."""
        layer, f = self.runner.layers[i], self.runner.fused[i]
        assert f is not None
        attn, mlp = layer.self_attn, layer.mlp
        w_in, w_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        plain: list[tuple[torch.Tensor, torch.Tensor | None]] = [
            (f.qkv_weight, f.qkv_bias), (attn.o_proj.weight, attn.o_proj.bias),
            (f.gate_up_weight, None), (mlp.down_proj.weight, mlp.down_proj.bias)]
        args: list[torch.Tensor | None] = []
        for linear, (weight, bias) in zip(_packed_linears(f), plain, strict=True):
            args += [linear.packed, linear.bias] if linear is not None else [weight, bias]
        qkv_w, qkv_b, o_w, o_b, gate_up_w, _, down_w, down_b = args
        return (w_in, w_post, qkv_w, qkv_b, o_w, o_b, gate_up_w, down_w, down_b)

    def layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Every decoder layer for rows ``0 .. B-1`` (``B = h.shape[0]``)."""
        return self._run(h, cos, sin, mask, pos, self.runner.cache.keys,
                         self.runner.cache.values, self.stance)

    def _run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
             pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
             stance: str) -> torch.Tensor:
        with torch.compiler.set_stance(stance):
            if self.unroll:
                return self.compiled(h, cos, sin, mask, pos, keys, values, self.weights)
            for i, weights in enumerate(self.weights):
                h = self.compiled(h, cos, sin, mask, pos, keys[i], values[i], *weights)
        return h

    def warm_up(self, batches: tuple[int, ...] = (1, 2, 4),
                should_stop: Callable[[], bool] | None = None) -> float:
        """Compile (or load from the disk cache) the graphs of these batch sizes on scratch
        tensors (the runner's cache is not touched); returns the seconds it took.
        ``should_stop`` is asked before each graph: True ends the warm-up there (shutdown).
        Safe in a thread of its own while the runner serves eager (compile_warmup.py)."""
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                for length in (64, 128):  # two lengths: the length dimension stays dynamic
                    if should_stop is not None and should_stop():
                        return time.perf_counter() - start
                    self._scratch_step(b, length)
        took = time.perf_counter() - start
        log.info("compiled decode step ready in %.1f s (graphs for batch %s)", took,
                 ", ".join(str(b) for b in batches))
        return took

    def _scratch_step(self, b: int, length: int) -> None:
        r, dev = self.runner, self.runner.device
        shape = (b + 4, r.num_kv_heads, length, r.head_dim)  # rows past b: as in a live cache
        with torch.inference_mode(False):  # like the cache's buffers (kv_cache.py)
            keys = [torch.zeros(shape, dtype=r.dtype, device=dev) for _ in self.weights]
            values = [torch.zeros(shape, dtype=r.dtype, device=dev) for _ in self.weights]
        pos = torch.arange(b, device=dev)
        h = torch.zeros(b, r.embed.weight.shape[1], dtype=r.dtype, device=dev)
        cos, sin = r.cos[pos].unsqueeze(1), r.sin[pos].unsqueeze(1)
        mask = torch.zeros(b * r.num_kv_heads, 1, length, dtype=torch.float32, device=dev)
        # batch and length are the graph's only dynamic sizes (batch 1 is specialized anyway)
        marks = [(h, (0,)), (cos, (0,)), (sin, (0,)), (pos, (0,)), (mask, (0, 2))]
        marks += [(t, (0, 2)) for t in keys + values]
        for t, dims in marks:
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(t, d)
        self._run(h, cos, sin, mask, pos, keys, values, "default")  # compiles here


def maybe_compile(runner: TransformerRunner, mode: str, **kwargs: Any) -> CompiledDecode | None:
    """``CompiledDecode`` for ``decode`` (one graph of a layer) or ``step`` (one graph of all
    layers); None (eager, with a warning saying why) for ``off`` or a model it cannot
    compile."""
    if mode == "off":
        return None
    try:
        return CompiledDecode(runner, unroll=mode == "step", **kwargs)
    except UnsupportedCompileError as exc:
        log.warning("TOKENFLEET_COMPILE=%s ignored, decode stays eager: %s", mode, exc)
        return None


def attach(runner: TransformerRunner, mode: str) -> float | None:
    """Give ``runner`` its compiled decode step for ``TOKENFLEET_COMPILE=mode`` and build
    its graphs (or load them from the disk cache); the seconds that took, None when off."""
    runner.compiled = maybe_compile(runner, mode)
    return runner.compiled.warm_up() if runner.compiled is not None else None
