"""Runs a Hugging Face decoder-only model over the row KV cache.

The weights and modules (embeddings, projections, norms, MLP, lm_head) are the model's own,
so bitsandbytes int8/nf4 layers work unchanged; only attention and the cache are ours:
- prefill: the chunks of a step are packed into one ``[N, hidden]`` batch for every matmul;
  attention (causal inside a chunk, over the row's cached prefix) runs for short chunks as
  padded batches, bitwise what it gives chunk by chunk, and for a long chunk by itself;
- decode: one token per row for rows ``0 .. B-1``; grouped-query attention is two batched
  matmuls on the contiguous cache (queries reshaped per KV head, no K/V repetition).
Supported: Llama-shaped models (Llama, SmolLM, Mistral without sliding window, Qwen2/3).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from worker.engine.kv_cache import CacheShape, RowKVCache
from worker.engine.packed import PackedLinear, pack_linear

if TYPE_CHECKING:
    from worker.engine.compiled_step import CompiledDecode
    from worker.engine.native_attention import NativeAttention
    from worker.engine.native_linear import NativeLinear
    from worker.engine.native_pointwise import NativePointwise


@dataclass(slots=True)
class PrefillChunk:
    """Prompt tokens ``[start, start + len(token_ids))`` of the sequence in ``row``."""

    row: int
    start: int
    token_ids: list[int]
    wants_logits: bool  # the chunk ends the prompt: sample the first token from it
    num_logits: int = 1  # logits of the chunk's last ``num_logits`` tokens (verification)
    # a speculative verification (a decoded token and its draft): with the native attention
    # its queries attend as decode queries do, so verified tokens are the decoded ones
    verify: bool = False


class ModelRunner(Protocol):
    """What the engine needs from a model: a cache and two forward passes."""

    cache: RowKVCache
    vocab_size: int
    max_context: int
    device: torch.device

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Fill the cache; logits ``[n, vocab]`` (float32) of chunks that want them (the
        last ``num_logits`` positions of each, in order)."""

    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """Feed one token to each of rows ``0 .. B-1``; logits ``[B, vocab]`` (float32)."""

    def decode_and_prefill(self, token_ids: list[int], positions: list[int],
                           chunks: list[PrefillChunk]) -> torch.Tensor:
        """``decode`` and ``prefill`` of one step in one pass: their logits, concatenated."""


_EXACT_CANDIDATES = 8

# Held around every forward pass. torch.fx's tracer patches ``torch.nn.Module.__call__`` for
# every thread while it traces, so a compile in another thread (compile_warmup.py) takes
# this lock around each trace: a step never calls a module through the patched method.
FORWARD_LOCK = threading.RLock()


class UnsupportedModelError(ValueError):
    pass


@dataclass(slots=True)
class FusedWeights:
    """One matmul for q/k/v and one for gate/up; the model's own modules keep views."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor
    # the same four projections packed for oneDNN (bf16 and fp32 on CPU, where the probe in
    # packed.py allows; None: F.linear)
    # (or all four through the native fp32 kernel: TOKENFLEET_LINEAR=native, native_linear.py)
    qkv_packed: PackedLinear | NativeLinear | None = None
    gate_up_packed: PackedLinear | NativeLinear | None = None
    o_packed: PackedLinear | NativeLinear | None = None
    down_packed: PackedLinear | NativeLinear | None = None

    @property
    def all_packed(self) -> bool:
        """All four projections run packed."""
        return None not in (self.qkv_packed, self.gate_up_packed, self.o_packed,
                            self.down_packed)


def _fuse_layer(layer: torch.nn.Module, pack: bool = True) -> FusedWeights | None:
    """Fuse plain (unquantized, bias-free MLP, SiLU) layers; None leaves the modules as is.
    ``pack``: also pack the four projections for oneDNN where packed.py's probe allows."""
    attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(type(m) is not torch.nn.Linear for m in linears):
        return None
    if getattr(mlp.act_fn, "__class__", None).__name__ not in ("SiLU", "SiLUActivation"):
        return None
    if linears[3].bias is not None or linears[4].bias is not None:
        return None
    q, k, v, gate, up = linears[:5]
    biases = [m.bias for m in (q, k, v)]
    qkv_bias = None
    if any(b is not None for b in biases):
        qkv_bias = torch.cat([
            b if b is not None else torch.zeros_like(m.weight[:, 0])
            for b, m in zip(biases, (q, k, v), strict=True)])
    fused = FusedWeights(_concat_into_views([q, k, v]), qkv_bias, _concat_into_views([gate, up]))
    if not pack:
        return fused
    o, down = attn.o_proj, linears[5]
    if type(o) is torch.nn.Linear:
        fused.o_packed = pack_linear(o.weight, o.bias)
    fused.qkv_packed = pack_linear(fused.qkv_weight, qkv_bias)
    fused.gate_up_packed = pack_linear(fused.gate_up_weight)
    fused.down_packed = pack_linear(down.weight, down.bias)
    return fused


def _concat_into_views(modules: list[torch.nn.Linear]) -> torch.Tensor:
    """Concatenate the weights and make each module's weight a view of the result."""
    with torch.no_grad():
        fused = torch.cat([m.weight for m in modules]).contiguous()
        offset = 0
        for m in modules:
            rows = m.weight.shape[0]
            m.weight = torch.nn.Parameter(fused[offset:offset + rows], requires_grad=False)
            offset += rows
    return fused


_MIN_ROWS = 4


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            packed: PackedLinear | NativeLinear | None = None) -> torch.Tensor:
    """``F.linear``, through the packed weight when there is one (bitwise the same in bf16,
    within ~1e-6 in fp32: see packed.py)."""
    if packed is not None:
        return _apply(packed, x)
    if x.shape[0] < _MIN_ROWS:
        return _apply(lambda t: F.linear(t, weight, bias), x)
    return F.linear(x, weight, bias)


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for a row-wise ``fn``, never on fewer than ``_MIN_ROWS`` rows.

    With one row, CPU matmul libraries take a matrix-vector path whose summation order
    differs from the matrix-matrix path, so a request's tokens would depend on whether it
    runs alone or in a batch; in fp32 (measured here: MKL, AVX-512) M = 2 and 3 round
    differently from M >= 4 as well. Padding to four rows takes the path of any batch; the
    cost is not measurable because such steps are bound by reading the weights.
    Quantized modules that set ``unpadded_rows`` (weight_int8: its int8pack kernel's cost
    grows with rows, and its rounding already depends on the row count) run unpadded.
    """
    n = x.shape[0]
    if n >= _MIN_ROWS or getattr(fn, "unpadded_rows", False):
        return fn(x)
    return fn(_pad_rows(x, _MIN_ROWS))[:n]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with its first row repeated at the end up to ``rows`` rows (dim 0)."""
    extra = x[:1].expand(rows - x.shape[0], *x.shape[1:])
    return torch.cat([x, extra])


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own norm. ``F.rms_norm`` is faster (one rounding instead of two in bf16)
    but drifts from the reference implementation's bf16 answers; fidelity wins here."""
    return module(x)


_TOP_BLOCK = 128


def _top_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's ``k`` largest logits (in no particular order), as
    ``torch.topk`` finds them but 3.5-4.5x faster over a large vocabulary on CPU (49,152:
    0.89 against 3.27 ms at 32 rows, 1.40 against 6.27 at 64): the top ``k`` values lie in
    the ``k`` blocks of ``_TOP_BLOCK`` with the largest maxima, so a block-max pass picks
    those blocks and ``topk`` runs over their ``k x _TOP_BLOCK`` values only."""
    rows, vocab = logits.shape
    blocks = vocab // _TOP_BLOCK
    if vocab % _TOP_BLOCK or blocks <= k:
        return torch.topk(logits, k, dim=-1).indices
    tiles = logits.view(rows, blocks, _TOP_BLOCK)
    top_blocks = torch.topk(tiles.amax(dim=-1), k, dim=-1).indices
    candidates = tiles.gather(1, top_blocks.unsqueeze(-1).expand(rows, k, _TOP_BLOCK))
    inner = torch.topk(candidates.view(rows, k * _TOP_BLOCK), k, dim=-1).indices
    return top_blocks.gather(1, inner // _TOP_BLOCK) * _TOP_BLOCK + inner % _TOP_BLOCK


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


_PV_BLOCK = 128


def _weighted_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs @ values`` whose rounding does not depend on how many masked keys trail.

    bf16 batched matmuls accumulate the key dimension in one order at any length. fp32 ones
    (M of a few hundred) switch blocking beyond about 128 keys, so a query's output would
    change with the chunk's total length (measured: 1.8e-7). In fp32 the keys are therefore
    summed in fixed 128-key blocks from position 0; blocks past a query add exact zeros.
    """
    total = probs.shape[-1]
    if probs.dtype != torch.float32 or total <= _PV_BLOCK:
        return torch.bmm(probs, values)
    out = torch.bmm(probs[..., :_PV_BLOCK], values[:, :_PV_BLOCK])
    for start in range(_PV_BLOCK, total, _PV_BLOCK):
        out.baddbmm_(probs[..., start:start + _PV_BLOCK], values[:, start:start + _PV_BLOCK])
    return out


class TransformerRunner:
    """Model runner for Llama-shaped Hugging Face models."""

    def __init__(self, model: torch.nn.Module, *, max_context: int | None = None,
                 pack_weights: bool = True) -> None:
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a Llama-shaped causal LM "
                "(expected model.model.layers and model.lm_head)"
            )
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        if (window and getattr(cfg, "use_sliding_window", True)
                and window < (max_context or cfg.max_position_embeddings)):
            raise UnsupportedModelError("sliding-window attention is not supported yet")
        self.model = model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        self.lm_head_packed: PackedLinear | NativeLinear | None = (
            pack_linear(self.lm_head.weight, self.lm_head.bias)
            if pack_weights and type(self.lm_head) is torch.nn.Linear else None)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.hidden_size = cfg.hidden_size
        self.group = self.num_heads // self.num_kv_heads
        self.scale = self.head_dim**-0.5
        self.vocab_size = cfg.vocab_size
        self.max_context = min(max_context or cfg.max_position_embeddings,
                               cfg.max_position_embeddings)
        self.device = self.embed.weight.device
        self.dtype = self._compute_dtype(model)
        self.cos, self.sin = self._rope_tables(inner.rotary_emb)
        self.fused = [_fuse_layer(layer, pack_weights) for layer in self.layers]
        # every matmul packed for oneDNN: a row's result never depends on the row count, so
        # fp32 can run a mixed step in one pass too (MKL's F.linear cannot, see below)
        self.rows_invariant = self.lm_head_packed is not None and all(
            f is not None and f.all_packed for f in self.fused)
        self.cache = RowKVCache(
            CacheShape(len(self.layers), self.num_kv_heads, self.head_dim, self.dtype, self.device)
        )
        # pure decode steps through compiled layers (TOKENFLEET_COMPILE=decode, compiled_step.py);
        # attached by compile_warmup.py once warm (maybe from its thread, between steps)
        self.compiled: CompiledDecode | None = None
        self.compile_state = "off"  # compile_warmup.COMPILE_STATES
        # decode (and verification) attention through the C kernel that reads each row's own
        # keys (TOKENFLEET_ATTENTION=native, native_attention.py); None: the torch bmms
        self.native: NativeAttention | None = None
        # every projection and the head through the native fp32 kernel (TOKENFLEET_LINEAR=
        # native, native_linear.attach): rows round alike at any row count, so no padding
        self.native_linear = False
        # norms, rotary, residual sums and the gated activation as four C calls a layer
        # (TOKENFLEET_POINTWISE, native_pointwise.attach); None: torch's operations
        self.pointwise: NativePointwise | None = None

    @staticmethod
    def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
        return model.model.embed_tokens.weight.dtype

    def _rope_tables(self, rotary: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in ("default", "linear", "llama3", "yarn"):
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported yet")
        inv_freq = rotary.inv_freq.to(device=self.device, dtype=torch.float32)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        positions = torch.arange(self.max_context, device=self.device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(self.dtype), (emb.sin() * scaling).to(self.dtype)

    # --- one layer's projections ----------------------------------------------------------
    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise is None:
            return _norm(module, x)
        return self.pointwise.norm(x, module.weight, module.variance_epsilon)

    def _qkv(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             normed: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed input -> rotated queries [n, H, D], rotated keys and values [n, KV, D].
        ``normed``: the input's norm when the previous layer computed it with its residual
        sum (``_finish_layer`` through the native kernels)."""
        layer, fused = self.layers[i], self.fused[i]
        if normed is None:
            normed = self._norm(layer.input_layernorm, h)
        x = normed
        n, heads, kv = x.shape[0], self.num_heads, self.num_kv_heads
        attn = layer.self_attn
        if fused is not None and not hasattr(attn, "q_norm"):
            qkv = _linear(x, fused.qkv_weight, fused.qkv_bias, fused.qkv_packed)
            qkv = qkv.view(n, heads + 2 * kv, -1)
            if self.pointwise is not None:
                return self.pointwise.rope(qkv, cos, sin, heads, kv)
            qk = _rotate(qkv[:, :heads + kv], cos, sin)
            return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv:]
        q = _apply(attn.q_proj, x).view(n, heads, self.head_dim)
        k = _apply(attn.k_proj, x).view(n, kv, self.head_dim)
        v = _apply(attn.v_proj, x).view(n, kv, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _finish_layer(self, i: int, h: torch.Tensor, attn_out: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output projection and MLP with their residual sums: ``(h, None)``;
        through the native kernels ``(h, mlp_out)``, the MLP's residual sum left to the next
        layer's ``add_norm`` (or the caller)."""
        layer, fused = self.layers[i], self.fused[i]
        o_proj = fused.o_packed if fused is not None else None
        if self.pointwise is not None and fused is not None:
            pw = self.pointwise
            norm = layer.post_attention_layernorm
            h, x = pw.add_norm(h, _apply(o_proj or layer.self_attn.o_proj, attn_out),
                               norm.weight, norm.variance_epsilon)
            gate_up = _linear(x, fused.gate_up_weight, None, fused.gate_up_packed)
            return h, _apply(fused.down_packed or layer.mlp.down_proj, pw.silu_mul(gate_up))
        h = h + _apply(o_proj or layer.self_attn.o_proj, attn_out)
        x = _norm(layer.post_attention_layernorm, h)
        if fused is None:
            return h + _apply(layer.mlp, x), None
        gate, up = _linear(x, fused.gate_up_weight, None, fused.gate_up_packed).chunk(2, dim=-1)
        return h + _apply(fused.down_packed or layer.mlp.down_proj, F.silu(gate).mul_(up)), None

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits; in reduced precision the leading candidates are recomputed exactly.

        A bf16 lm_head rounds logits of ~16 to steps of 0.125, which makes ties and wrong
        argmaxes common. Recomputing the top candidates in float32 (8 dot products a row)
        gives greedy decoding fp32-accurate choices for a fraction of a full fp32 lm_head.
        """
        x = self._norm(self.final_norm, h)
        logits = _apply(self.lm_head_packed or self.lm_head, x).float()
        weight = getattr(self.lm_head, "weight", None)
        if self.dtype == torch.float32 or type(self.lm_head) is not torch.nn.Linear:
            return logits
        candidates = _top_indices(logits, _EXACT_CANDIDATES)
        exact = torch.einsum("nh,nkh->nk", x.float(), weight[candidates].float())
        return logits.scatter_(1, candidates, exact)

    # --- the forward pass -------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        return self.decode_and_prefill(token_ids, positions, [])

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        return self.decode_and_prefill([], [], chunks)

    @torch.inference_mode()
    def decode_and_prefill(self, token_ids: list[int], positions: list[int],
                           chunks: list[PrefillChunk]) -> torch.Tensor:
        """A step's decode rows ``0 .. B-1`` and prefill chunks in one pass: every matmul
        reads the weights once for all of their tokens (a mixed step used to run two
        passes). Logits: the decode rows', then the chunks' as ``prefill`` gives them.
        Per-row results are bitwise those of the separate passes: bf16 matmuls do not depend
        on the row count or a row's place among them, and attention stays per decode batch
        and per chunk. fp32 MKL ones do: rows in a trailing partial block of 4 round
        differently (~5e-6), so in fp32 the two passes stay separate unless every matmul is
        packed for oneDNN (``rows_invariant``), whose fp32 rows do not depend on the count."""
        with FORWARD_LOCK:
            return self._forward(token_ids, positions, chunks)

    def _forward(self, token_ids: list[int], positions: list[int],
                 chunks: list[PrefillChunk]) -> torch.Tensor:
        if (self.dtype == torch.float32 and not self.rows_invariant and token_ids
                and chunks):
            return torch.cat([self.decode_and_prefill(token_ids, positions, []),
                              self.decode_and_prefill([], [], chunks)])
        dev, b = self.device, len(token_ids)
        flat = [t for c in chunks for t in c.token_ids]
        prompt_pos = [p for c in chunks for p in range(c.start, c.start + len(c.token_ids))]
        pos = torch.tensor(positions + prompt_pos, device=dev)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        h = self.embed(torch.tensor(token_ids + flat, device=dev))
        compiled = self.compiled  # read once: attached from another thread (compile_warmup.py)
        if compiled is not None and not chunks:
            return self._logits(compiled.layers(h, cos, sin, self._decode_mask(pos), pos))
        decode = self._decode_index(pos[:b])
        plan = self._chunk_plan(chunks, b, pos[b:]) if chunks else None
        pending: torch.Tensor | None = None  # the last MLP's output, not yet added to h
        for i in range(len(self.layers)):
            normed = None
            if pending is not None:
                assert self.pointwise is not None
                norm = self.layers[i].input_layernorm
                h, normed = self.pointwise.add_norm(h, pending, norm.weight,
                                                    norm.variance_epsilon)
            q, k, v = self._qkv(i, h, cos, sin, normed)
            if plan is None:
                out = self._decode_attention(i, q, k, v, decode)
            else:
                out = torch.empty(b + len(flat), self.num_heads * self.head_dim, device=dev,
                                  dtype=self.dtype)
                if b:
                    out[:b] = self._decode_attention(i, q[:b], k[:b], v[:b], decode)
                self._chunks_attention(i, plan, q, k, v, out)
            h, pending = self._finish_layer(i, h, out)
        if pending is not None:
            h = h + pending
        ends, offset = list(range(b)), b
        for chunk in chunks:
            offset += len(chunk.token_ids)
            if chunk.wants_logits:
                ends.extend(range(offset - chunk.num_logits, offset))
        if not ends:
            return torch.empty(0, self.vocab_size, device=dev)
        if len(ends) == h.shape[0]:
            return self._logits(h)
        return self._logits(h[torch.tensor(ends, device=dev)])

    def _decode_mask(self, pos: torch.Tensor) -> torch.Tensor:
        """Additive mask ``[B * kv_heads, 1, len_cap]``: row ``r`` sees keys ``<= pos[r]``."""
        b, length = pos.shape[0], self.cache.len_cap
        visible = torch.arange(length, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)
        mask = torch.zeros(b, 1, length, device=self.device, dtype=torch.float32)
        mask.masked_fill_(~visible.unsqueeze(1), float("-inf"))
        return mask.repeat_interleave(self.num_kv_heads, dim=0)

    def _kv_slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where token ``t``'s key for KV head ``h`` goes in a layer's cache buffer
        ``[rows, kv, cap, D]`` viewed flat as ``[rows x kv x cap, D]``: ``(rows[t] kv + h)
        cap + positions[t]``, token-major (``k [T, kv, D]`` reshaped to ``[T x kv, D]``).
        Computed once a step: every layer writes its keys and values by it (``_write_kv``)."""
        heads = torch.arange(self.num_kv_heads, device=self.device)
        return ((rows.unsqueeze(1) * self.num_kv_heads + heads) * self.cache.len_cap
                + positions.unsqueeze(1)).reshape(-1)

    def _write_kv(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> None:
        """Tokens' new keys and values into layer ``layer_idx``'s cache at ``slots``
        (``_kv_slots``): one ``index_copy_`` each, where an advanced-index put
        (``keys[rows, :, pos] = k``) cost 2-3x more (4.1-8.3 against 6.9-12.8 us at 1-32 rows)."""
        dim = self.head_dim
        self.cache.keys[layer_idx].view(-1, dim).index_copy_(0, slots, k.reshape(-1, dim))
        self.cache.values[layer_idx].view(-1, dim).index_copy_(0, slots, v.reshape(-1, dim))

    def _decode_index(self, pos: torch.Tensor) -> _DecodeIndex:
        """What every layer's decode attention of this step shares, built once a step instead
        of once a layer: where each row's new key goes, and the torch path's mask or the
        native kernel's rows and lengths (checked here, once)."""
        rows = torch.arange(pos.shape[0], device=self.device)
        slots = self._kv_slots(rows, pos)
        if self.native is None:
            return _DecodeIndex(slots, self._decode_mask(pos))
        lens = pos + 1
        self.native.check_lens(lens, self.cache.len_cap)
        return _DecodeIndex(slots, None, rows, lens)

    def _decode_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, decode: _DecodeIndex) -> torch.Tensor:
        """One new token per row ``0 .. B-1``: write its key and value, attend over the row's
        whole buffer (masked past its position); grouped-query attention as two batched
        matmuls per KV head on the contiguous cache."""
        b, length = q.shape[0], self.cache.len_cap
        self._write_kv(layer_idx, decode.slots, k, v)
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        if self.native is not None:
            assert decode.rows is not None and decode.lens is not None
            return self.native.attend(q, keys, values, decode.rows, decode.lens, self.scale,
                                      checked=True)
        assert decode.mask is not None
        kb = keys[:b].view(b * self.num_kv_heads, length, self.head_dim)
        vb = values[:b].view(b * self.num_kv_heads, length, self.head_dim)
        qb = q.reshape(b * self.num_kv_heads, self.group, self.head_dim)
        scores = torch.bmm(qb, kb.transpose(1, 2)).float().mul_(self.scale).add_(decode.mask)
        probs = torch.softmax(scores, dim=-1).to(self.dtype)
        return torch.bmm(probs, vb).view(b, self.num_heads * self.head_dim)

    def _chunk_plan(self, chunks: list[PrefillChunk], offset: int,
                    positions: torch.Tensor) -> _ChunkPlan:
        """How a step's chunks attend: short ones together as padded batches, a chunk that
        would mostly add padding alone (see ``_group_chunks``). ``offset``: the step index of
        the first chunk token (after the decode rows); ``positions``: the chunk tokens'."""
        dev = self.device
        rows = torch.tensor([c.row for c in chunks for _ in c.token_ids], device=dev,
                            dtype=torch.long)
        offsets = []
        for c in chunks:
            offsets.append(offset)
            offset += len(c.token_ids)
        alone: list[_OneChunk] = []
        batches: list[_ChunkBatch] = []
        native = None
        if self.native is not None and any(c.verify for c in chunks):
            native = self._native_queries(chunks, offsets)
            keep = [j for j, c in enumerate(chunks) if not c.verify]
            chunks, offsets = [chunks[j] for j in keep], [offsets[j] for j in keep]
        for members in _group_chunks(chunks, self.num_heads, self.group):
            if len(members) == 1:
                j = members[0]
                c = chunks[j]
                alone.append(_OneChunk(c, self._chunk_mask(c), offsets[j],
                                       offsets[j] + len(c.token_ids)))
            else:
                batches.append(self._chunk_batch([chunks[j] for j in members],
                                                 [offsets[j] for j in members]))
        return _ChunkPlan(self._kv_slots(rows, positions), alone, batches, native)

    def _native_queries(self, chunks: list[PrefillChunk], offsets: list[int]) -> _NativeQueries:
        """The verification chunks' queries for the native kernel: step index, cache row and
        visible keys (its position + 1) of each, as decode queries."""
        index, rows, lens = [], [], []
        for c, offset in zip(chunks, offsets, strict=True):
            if c.verify:
                n = len(c.token_ids)
                index += range(offset, offset + n)
                rows += [c.row] * n
                lens += range(c.start + 1, c.start + n + 1)

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=self.device, dtype=torch.long)

        queries = _NativeQueries(longs(index), longs(rows), longs(lens))
        assert self.native is not None
        self.native.check_lens(queries.lens, self.cache.len_cap)  # once a step, not a layer
        return queries

    def _chunk_mask(self, chunk: PrefillChunk) -> torch.Tensor:
        """Additive mask ``[n, start + n]``: query ``start + j`` sees keys ``<= start + j``."""
        n = len(chunk.token_ids)
        total = chunk.start + n
        key_pos = torch.arange(total, device=self.device).unsqueeze(0)
        query_pos = torch.arange(chunk.start, total, device=self.device).unsqueeze(1)
        mask = torch.zeros(n, total, device=self.device, dtype=torch.float32)
        return mask.masked_fill_(key_pos > query_pos, float("-inf"))

    def _chunk_batch(self, chunks: list[PrefillChunk], offsets: list[int]) -> _ChunkBatch:
        """Index tensors and the mask of chunks attending as one batch padded to ``width``
        queries and ``span`` keys. A padding query repeats its chunk's first token and sees
        key 0 only (its result is dropped); a real query sees keys ``<= its position``."""
        dev = self.device
        width = max(max(len(c.token_ids) for c in chunks), -(-_MIN_ROWS // self.group))
        span = max(c.start + len(c.token_ids) for c in chunks)
        gather, keep, dest, query_pos = [], [], [], []
        for slot, (c, offset) in enumerate(zip(chunks, offsets, strict=True)):
            n = len(c.token_ids)
            gather += [offset + j for j in range(n)] + [offset] * (width - n)
            keep += range(slot * width, slot * width + n)
            dest += range(offset, offset + n)
            query_pos += [c.start + j for j in range(n)] + [0] * (width - n)
        query = torch.tensor(query_pos, device=dev).view(len(chunks), 1, 1, width, 1)
        keys = torch.arange(span, device=dev)
        mask = torch.zeros(len(chunks), 1, 1, width, span, device=dev, dtype=torch.float32)
        mask.masked_fill_(keys > query, float("-inf"))

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=dev, dtype=torch.long)

        return _ChunkBatch(longs([c.row for c in chunks]), width, span, longs(gather),
                           longs(keep), longs(dest), mask)

    def _chunks_attention(self, layer_idx: int, plan: _ChunkPlan, q: torch.Tensor,
                          k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Write every chunk token's key and value into its row, then attend: each padded
        batch in one pass, each lone chunk by itself; results go to ``out`` (step index)."""
        first = out.shape[0] - plan.slots.shape[0] // self.num_kv_heads  # the decode rows
        self._write_kv(layer_idx, plan.slots, k[first:], v[first:])
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        for one in plan.alone:
            start, end = one.offset, one.end
            out[start:end] = self._chunk_attention(layer_idx, one.chunk, one.mask, q[start:end])
        for batch in plan.batches:
            out.index_copy_(0, batch.dest, self._batch_attention(layer_idx, batch, q))
        if plan.native is not None:
            assert self.native is not None
            nq = plan.native
            out.index_copy_(0, nq.index, self.native.attend(
                q.index_select(0, nq.index), keys, values, nq.rows, nq.lens, self.scale,
                checked=True))

    def _batch_attention(self, layer_idx: int, batch: _ChunkBatch,
                         q: torch.Tensor) -> torch.Tensor:
        """``_chunk_attention`` of ``C`` chunks as one padded pass: queries ``[C x kv,
        group x width, dim]`` against each row's keys ``[0, span)``; bitwise the per-chunk
        results (tested): a query's scores are dot products over ``dim`` whatever the batch,
        masked keys (past the query, or past the chunk) add exact zeros, and the values are
        summed as ``_weighted_values`` sums them (fixed blocks in fp32). Returns ``[tokens,
        heads x dim]`` in the order of the batch's chunks."""
        c, width, span = batch.rows.shape[0], batch.width, batch.span
        kv, group, dim = self.num_kv_heads, self.group, self.head_dim
        kk = self.cache.keys[layer_idx][:, :, :span].index_select(0, batch.rows)
        vv = self.cache.values[layer_idx][:, :, :span].index_select(0, batch.rows)
        qq = q.index_select(0, batch.gather).view(c, width, kv, group, dim)
        qq = qq.permute(0, 2, 3, 1, 4).reshape(c * kv, group * width, dim)
        scores = torch.bmm(qq, kk.view(c * kv, span, dim).transpose(1, 2)).float()
        scores = scores.mul_(self.scale).view(c, kv, group, width, span).add_(batch.mask)
        probs = torch.softmax(scores.view(c * kv, group * width, span), dim=-1).to(self.dtype)
        res = _weighted_values(probs, vv.view(c * kv, span, dim))
        res = res.view(c, kv, group, width, dim).permute(0, 3, 1, 2, 4)
        return res.reshape(c * width, kv * group * dim).index_select(0, batch.keep)

    def _chunk_attention(self, layer_idx: int, chunk: PrefillChunk, mask: torch.Tensor,
                         q: torch.Tensor) -> torch.Tensor:
        """Attention of a chunk's queries over the row's keys ``[0, start + n)`` (written).

        The same math as decode (two batched matmuls per KV head, fp32 softmax with an
        additive mask), not ``scaled_dot_product_attention``: the flash kernel's blocking
        depends on the chunk's length, so a token's keys and values would depend on where
        the prompt was cut into chunks (measured: 0.125 on SmolLM2 bf16 keys at 230 tokens
        cut at 208), and a prefix-cache hit would not give the tokens a cold prefill gives.
        Here a query's result depends only on the keys it sees (masked keys add exact zeros).
        """
        n = q.shape[0]
        start, row = chunk.start, chunk.row
        kv, group, dim = self.num_kv_heads, self.group, self.head_dim
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        total = start + n
        kk, vv = keys[row, :, :total], values[row, :, :total]
        qq = q.transpose(0, 1).reshape(kv, group * n, dim)
        rows = group * n  # fewer than _MIN_ROWS query rows round differently (see _apply)
        if rows < _MIN_ROWS:
            qq = _pad_rows(qq.transpose(0, 1), _MIN_ROWS).transpose(0, 1).contiguous()
        scores = torch.bmm(qq, kk.transpose(1, 2)).float().mul_(self.scale)
        pad = scores.shape[1] - rows
        if pad:
            mask = torch.cat([mask.repeat(group, 1), mask[:1].expand(pad, total)])
            scores = scores.add_(mask)
        else:
            scores = scores.view(kv, group, n, total).add_(mask).view(kv, rows, total)
        probs = torch.softmax(scores, dim=-1).to(self.dtype)
        out = _weighted_values(probs, vv)[:, :rows]
        return out.reshape(self.num_heads, n, dim).transpose(0, 1).reshape(n, -1)


@dataclass(slots=True)
class _OneChunk:
    """A chunk attending by itself: its mask and its tokens' step indices ``[offset, end)``."""

    chunk: PrefillChunk
    mask: torch.Tensor
    offset: int
    end: int


@dataclass(slots=True)
class _ChunkBatch:
    """Chunks attending as one pass padded to ``width`` queries and ``span`` keys each."""

    rows: torch.Tensor  # [C] cache rows
    width: int
    span: int
    gather: torch.Tensor  # [C x width] step index of each padded query
    keep: torch.Tensor  # [tokens] padded slot of each real query
    dest: torch.Tensor  # [tokens] its step index
    mask: torch.Tensor  # [C, 1, 1, width, span] additive, float32


@dataclass(slots=True)
class _DecodeIndex:
    """A step's decode rows ``0 .. B-1``, for every layer's ``_decode_attention``."""

    slots: torch.Tensor  # [B x kv_heads] each row's and KV head's new key in a flat layer
    mask: torch.Tensor | None  # torch attention: ``_decode_mask``
    rows: torch.Tensor | None = None  # native kernel: [B] cache rows, 0 .. B-1
    lens: torch.Tensor | None = None  # native kernel: [B] keys each row sees


@dataclass(slots=True)
class _ChunkPlan:
    """A step's chunk attention: where each chunk token's key goes, and who attends how."""

    slots: torch.Tensor  # [tokens x kv_heads] each chunk token's keys (``_kv_slots``)
    alone: list[_OneChunk]
    batches: list[_ChunkBatch]
    native: _NativeQueries | None = None  # verification queries, native kernel


@dataclass(slots=True)
class _NativeQueries:
    """Chunk queries that attend through the native kernel, as decode queries do."""

    index: torch.Tensor  # [n] step index of each query
    rows: torch.Tensor  # [n] its cache row
    lens: torch.Tensor  # [n] keys it sees: its position + 1


# a batch may spend half its real attention work on padding, plus this much (query x key
# products per head) that any small batch may waste
_PAD_SLACK = 16 * 256
# at most this many fp32 scores per batch (1.5 MiB): a bigger batch's softmax and casts
# leave the core's cache (30 chunks of 15 after a 200-token hit, SmolLM2 bf16, one thread:
# 3.2-3.5 ms a layer in batches of 8, 3.6-3.8 ms in one batch, 6.1-6.5 ms chunk by chunk)
_MAX_BATCH_SCORES = 3 * 128 * 1024
# chunks seeing fewer keys attend alone: fp32 (MKL) scores over up to 11 keys round
# otherwise than over more (measured), so padding their keys would change them
_MIN_BATCH_SPAN = 16


def _group_chunks(chunks: list[PrefillChunk], heads: int, group: int) -> list[list[int]]:
    """Indices of ``chunks`` in batches (each in step order): longest first, a chunk joins
    the current batch while the batch's padded work stays within 1.5 times its real work
    plus ``_PAD_SLACK`` and its scores within ``_MAX_BATCH_SCORES``; otherwise it starts
    the next one. One long chunk among short ones goes
    alone; a step of similar short chunks is one batch. A chunk seeing fewer than
    ``_MIN_BATCH_SPAN`` keys always goes alone."""
    order = sorted(range(len(chunks)), key=lambda j: -len(chunks[j].token_ids))
    batches: list[list[int]] = []
    alone: list[list[int]] = []
    width = span = real = 0
    min_width = -(-_MIN_ROWS // group)
    for j in order:
        n, total = len(chunks[j].token_ids), chunks[j].start + len(chunks[j].token_ids)
        if total < _MIN_BATCH_SPAN:
            alone.append([j])
            continue
        if batches:
            w, s = max(width, n, min_width), max(span, total)
            padded = (len(batches[-1]) + 1) * w * s
            if (2 * padded <= 3 * (real + n * total) + 2 * _PAD_SLACK
                    and padded * heads <= _MAX_BATCH_SCORES):
                batches[-1].append(j)
                width, span, real = w, s, real + n * total
                continue
        batches.append([j])
        width, span, real = max(n, min_width), total, n * total
    return [sorted(b) for b in batches] + alone
