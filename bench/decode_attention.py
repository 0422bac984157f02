"""Decode attention alone: the runner's whole-buffer math against the alternatives tried.

    flock /tmp/tf-bench.lock nice -n -15 python -m bench.decode_attention --batch 64 --cap 384

One decode step's attention over ``--layers`` layers of a row KV cache shaped like the
runner's (``[rows, kv_heads, cap, head_dim]`` per layer; SmolLM2-135M's 3 KV heads, group
3, head_dim 64 by default), so the cache is far bigger than the CPU's caches, as in a real
step. Row lengths follow the bench's mixed workload (a 30-60 token prompt plus a point
inside a max_tokens budget drawn time-weighted from its cycle), or ``--length`` for all.
Prints the best of ``--reps`` passes per variant (ms per step and per layer) and each
variant's largest difference from the runner's math. See docs/design/engine.md
("Decode attention over padding").
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIXED_BUDGETS = (16, 256, 32, 128, 64, 16, 32, 64)  # bench.workload's mixed cycle


@dataclass(slots=True)
class Batch:
    """One step's inputs: queries ``[B, kv * group, D]``, per-layer caches, row lengths."""

    q: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor  # tokens per row, the new one included (position + 1)
    group: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, kv, cap, dim = self.keys[0].shape
        return b, kv, cap, dim


Variant = Callable[[Batch, int], torch.Tensor]


def mixed_lengths(batch: int, cap: int, gen: torch.Generator) -> torch.Tensor:
    """Row lengths like the mixed workload's running rows (time-weighted budgets)."""
    budgets = torch.tensor(MIXED_BUDGETS)
    pick = torch.multinomial(budgets.float(), batch, replacement=True, generator=gen)
    progress = (torch.rand(batch, generator=gen) * budgets[pick]).long()
    prompt = torch.randint(30, 61, (batch,), generator=gen)
    return (prompt + progress).clamp(1, cap)


def make_batch(batch: int, cap: int, layers: int, *, kv: int = 3, group: int = 3,
               dim: int = 64, dtype: torch.dtype = torch.bfloat16, length: int | None = None,
               seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.full((batch,), min(length, cap)) if length
               else mixed_lengths(batch, cap, gen))

    def buf() -> torch.Tensor:
        t = torch.randn(batch, kv, cap, dim, generator=gen).to(dtype)
        keep = torch.arange(cap).view(1, 1, cap, 1) < lengths.view(batch, 1, 1, 1)
        return t * keep  # past a row's length the cache holds zeros, as the runner's does

    q = torch.randn(batch, kv * group, dim, generator=gen).to(dtype)
    return Batch(q, [buf() for _ in range(layers)], [buf() for _ in range(layers)], lengths,
                 group)


def additive_mask(lengths: torch.Tensor, length: int, kv: int) -> torch.Tensor:
    """``[B * kv, 1, length]``: 0 where a row sees the key, -inf past its length."""
    hidden = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
    mask = torch.zeros(lengths.shape[0], 1, length).masked_fill_(hidden.unsqueeze(1), -math.inf)
    return mask.repeat_interleave(kv, dim=0)


def _two_bmms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              group: int) -> torch.Tensor:
    """The runner's math on ``[n, kv, L, D]`` caches: two bmms per KV head, fp32 softmax."""
    n, kv, length, dim = k.shape
    qb = q.reshape(n * kv, group, dim)
    scores = torch.bmm(qb, k.reshape(n * kv, length, dim).transpose(1, 2)).float()
    probs = torch.softmax(scores.mul_(dim**-0.5).add_(mask), dim=-1).to(q.dtype)
    return torch.bmm(probs, v.reshape(n * kv, length, dim)).view(n, -1)


def buffer_variant(masks: dict[str, torch.Tensor]) -> Variant:
    """Kept (the runner's ``_decode_attention``): the whole contiguous buffer, masked."""

    def run(b: Batch, i: int) -> torch.Tensor:
        return _two_bmms(b.q, b.keys[i], b.values[i], masks["buffer"], b.group)
    return run


def slice_variant(masks: dict[str, torch.Tensor], longest: int) -> Variant:
    """Only the batch's longest length: ``[:, :, :L]`` is strided, so it is copied first."""

    def run(b: Batch, i: int) -> torch.Tensor:
        k, v = b.keys[i][:, :, :longest], b.values[i][:, :, :longest]
        return _two_bmms(b.q, k, v, masks["slice"], b.group)
    return run


def scratch_variant(b: Batch, masks: dict[str, torch.Tensor], longest: int) -> Variant:
    """The longest-length slice copied into buffers allocated once (no allocation per call)."""
    n, kv, _, dim = b.shape
    k_buf = torch.empty(n, kv, longest, dim, dtype=b.q.dtype)
    v_buf = torch.empty_like(k_buf)

    def run(b: Batch, i: int) -> torch.Tensor:
        k_buf.copy_(b.keys[i][:, :, :longest])
        v_buf.copy_(b.values[i][:, :, :longest])
        return _two_bmms(b.q, k_buf, v_buf, masks["slice"], b.group)
    return run


def groups_variant(b: Batch, groups: int, align: int = 16) -> Variant:
    """Rows sorted by length into ``groups`` groups, each over its own longest length
    (rounded up to ``align``), gathered from the cache rows where they sit."""
    n, kv, cap, _ = b.shape
    order = torch.argsort(b.lengths, descending=True)
    plan = []
    for rows in torch.tensor_split(order, groups):
        if rows.numel():
            length = min(cap, -(-int(b.lengths[rows].max()) // align) * align)
            plan.append((rows, length, additive_mask(b.lengths[rows], length, kv)))

    def run(b: Batch, i: int) -> torch.Tensor:
        out = torch.empty(n, b.q.shape[1] * b.q.shape[2], dtype=b.q.dtype)
        for rows, length, mask in plan:
            k, v = b.keys[i][rows, :, :length], b.values[i][rows, :, :length]
            out[rows] = _two_bmms(b.q[rows], k, v, mask, b.group)
        return out
    return run


def sdpa_variant(b: Batch) -> Variant:
    """``F.scaled_dot_product_attention``, the group's queries as a 3-token query per KV head."""
    n, kv, cap, dim = b.shape
    visible = (torch.arange(cap).unsqueeze(0) < b.lengths.unsqueeze(1)).view(n, 1, 1, cap)

    def run(b: Batch, i: int) -> torch.Tensor:
        q = b.q.view(n, kv, b.group, dim)
        return F.scaled_dot_product_attention(q, b.keys[i], b.values[i],
                                              attn_mask=visible).reshape(n, -1)
    return run


def keys_t_variant(b: Batch, masks: dict[str, torch.Tensor]) -> Variant:
    """Keys stored transposed (``[rows, kv, D, cap]``) so ``q @ K`` is a plain NN bmm."""
    keys_t = [k.transpose(2, 3).contiguous() for k in b.keys]
    n, kv, cap, dim = b.shape

    def run(b: Batch, i: int) -> torch.Tensor:
        qb = b.q.reshape(n * kv, b.group, dim)
        scores = torch.bmm(qb, keys_t[i].view(n * kv, dim, cap)).float()
        probs = torch.softmax(scores.mul_(dim**-0.5).add_(masks["buffer"]), dim=-1)
        return torch.bmm(probs.to(b.q.dtype), b.values[i].view(n * kv, cap, dim)).view(n, -1)
    return run


def fused_variant(b: Batch) -> Variant:
    """Fewer passes over the scores: the scale folded into the queries (exact for a power of
    two), the mask written into the bf16 scores, the fp32 cast inside the softmax."""
    n, kv, cap, dim = b.shape
    hidden = (torch.arange(cap).unsqueeze(0) >= b.lengths.unsqueeze(1))
    hidden = hidden.repeat_interleave(kv, dim=0).unsqueeze(1)

    def run(b: Batch, i: int) -> torch.Tensor:
        qb = b.q.reshape(n * kv, b.group, dim).mul(dim**-0.5)
        scores = torch.bmm(qb, b.keys[i].view(n * kv, cap, dim).transpose(1, 2))
        probs = torch.softmax(scores.masked_fill_(hidden, -math.inf), -1, dtype=torch.float32)
        return torch.bmm(probs.to(b.q.dtype), b.values[i].view(n * kv, cap, dim)).view(n, -1)
    return run


def padded_variant(b: Batch, masks: dict[str, torch.Tensor], rows: int = 4) -> Variant:
    """The group's queries padded to ``rows`` rows per KV head (a bigger M for the matmul)."""
    n, kv, cap, dim = b.shape
    pad = rows - b.group

    def run(b: Batch, i: int) -> torch.Tensor:
        qb = b.q.reshape(n * kv, b.group, dim)
        qb = torch.cat([qb, qb[:, :1].expand(n * kv, pad, dim)], dim=1)
        scores = torch.bmm(qb, b.keys[i].view(n * kv, cap, dim).transpose(1, 2)).float()
        probs = torch.softmax(scores.mul_(dim**-0.5).add_(masks["buffer"]), dim=-1)
        out = torch.bmm(probs.to(b.q.dtype), b.values[i].view(n * kv, cap, dim))
        return out[:, :b.group].reshape(n, -1)
    return run


def keys_first_variant(b: Batch, masks: dict[str, torch.Tensor]) -> Variant:
    """Scores as ``K @ q^T`` (``[cap, group]`` per KV head: the keys are the matmul's M)."""
    n, kv, cap, dim = b.shape

    def run(b: Batch, i: int) -> torch.Tensor:
        qt = b.q.reshape(n * kv, b.group, dim).transpose(1, 2)
        scores = torch.bmm(b.keys[i].view(n * kv, cap, dim), qt).transpose(1, 2).float()
        probs = torch.softmax(scores.mul_(dim**-0.5).add_(masks["buffer"]), dim=-1)
        return torch.bmm(probs.to(b.q.dtype), b.values[i].view(n * kv, cap, dim)).view(n, -1)
    return run


def native_variant(b: Batch) -> Variant | None:
    """The runner's ``TOKENFLEET_ATTENTION=native`` kernel (None where it cannot be built)."""
    from worker.engine.native_attention import NativeAttentionError, load

    try:
        kernel = load()
    except NativeAttentionError as exc:
        print(f"native kernel unavailable: {exc}")
        return None
    n, kv, _, dim = b.shape
    rows = torch.arange(n)

    def run(b: Batch, i: int) -> torch.Tensor:
        q = b.q.view(n, kv * b.group, dim)
        return kernel.attend(q, b.keys[i], b.values[i], rows, b.lengths, dim**-0.5)
    return run


def variants(b: Batch) -> dict[str, Variant]:
    _, kv, cap, _ = b.shape
    longest = int(b.lengths.max())
    masks = {"buffer": additive_mask(b.lengths, cap, kv),
             "slice": additive_mask(b.lengths, longest, kv)}
    found: dict[str, Variant | None] = {
        "buffer (kept)": buffer_variant(masks),
        "native kernel (own keys)": native_variant(b),
        f"slice to longest ({longest})": slice_variant(masks, longest),
        "slice into scratch": scratch_variant(b, masks, longest),
        "2 length groups": groups_variant(b, 2),
        "4 length groups": groups_variant(b, 4),
        "sdpa": sdpa_variant(b),
        "keys stored transposed": keys_t_variant(b, masks),
        "scores as K @ q^T": keys_first_variant(b, masks),
        "queries padded to 4 rows": padded_variant(b, masks),
        "fused score passes": fused_variant(b),
    }
    return {name: fn for name, fn in found.items() if fn is not None}


def time_variant(fn: Variant, b: Batch, reps: int) -> float:
    """Best wall seconds of ``reps`` passes over every layer (one warm-up pass first)."""
    layers = len(b.keys)
    for i in range(layers):
        fn(b, i)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(layers):
            fn(b, i)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cap", type=int, default=384, help="the buffer's length (len_cap)")
    parser.add_argument("--length", type=int, default=None, help="every row's length")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--only", default="", help="comma-separated name prefixes")
    args = parser.parse_args(argv)
    b = make_batch(args.batch, args.cap, args.layers, dtype=getattr(torch, args.dtype),
                   length=args.length)
    lengths = b.lengths.float()
    print(f"{args.dtype}, batch {args.batch}, cap {args.cap}, lengths mean "
          f"{lengths.mean():.0f} max {int(lengths.max())}, {args.layers} layers, threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    chosen = variants(b)
    reference = chosen["buffer (kept)"](b, 0).float()
    for name, fn in chosen.items():
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        diff = (fn(b, 0).float() - reference).abs().max().item()
        best = time_variant(fn, b, args.reps)
        print(f"{name:28s} {best * 1e3:8.2f} ms/step {best * 1e3 / args.layers:7.3f} ms/layer"
              f"  max diff {diff:.2e}")


if __name__ == "__main__":
    main()
