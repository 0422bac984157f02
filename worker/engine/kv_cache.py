"""Row-slot KV cache: one contiguous ``[rows, kv_heads, len_cap, head_dim]`` buffer per layer.

Each running sequence owns one row; its token ``i`` sits at position ``i``. Rows in use are
kept dense (``0 .. num_rows-1``): freeing a row moves the last row into the hole, so a
decode step works on the prefix ``[:batch]`` with no gather. The buffer is attended in full
(positions past a row's length are masked), because on CPU a matmul over a contiguous
buffer is several times faster than over a strided slice of it; ``len_cap`` therefore
tracks the longest row closely: it grows and shrinks in ``len_align`` steps, and the
scheduler keeps ``rows x longest reservation`` under the token budget, so memory is bounded
by ``max_batch_tokens`` (see docs/design/engine.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class RowKVCache:
    """Owns the key/value tensors and which sequence sits in which row."""

    def __init__(self, shape: CacheShape, *, row_align: int = 4, len_align: int = 64) -> None:
        self.shape = shape
        self.row_align = row_align
        self.len_align = len_align
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows_cap = 0
        self.len_cap = 0
        self._row_of: dict[str, int] = {}
        self._owner: list[str] = []  # row -> sequence id, dense
        self._lengths: list[int] = []  # row -> tokens written

    # --- bookkeeping ------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self._owner)

    def row_of(self, seq_id: str) -> int:
        return self._row_of[seq_id]

    def length_of(self, seq_id: str) -> int:
        return self._lengths[self._row_of[seq_id]]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._row_of

    @property
    def num_tokens(self) -> int:
        return sum(self._lengths)

    @property
    def allocated_tokens(self) -> int:
        return self.rows_cap * self.len_cap

    @property
    def allocated_bytes(self) -> int:
        return self.allocated_tokens * self.shape.bytes_per_token

    def allocate(self, seq_id: str) -> int:
        """Give ``seq_id`` the next free row (empty; capacity is ensured separately)."""
        if seq_id in self._row_of:
            raise ValueError(f"sequence {seq_id} already has a row")
        row = len(self._owner)
        self._owner.append(seq_id)
        self._lengths.append(0)
        self._row_of[seq_id] = row
        return row

    def free(self, seq_id: str) -> None:
        """Release a row; the last row moves into the hole so rows stay dense."""
        row = self._row_of.pop(seq_id)
        last = len(self._owner) - 1
        if row != last:
            self._move_row(last, row)
        self._owner.pop()
        self._lengths.pop()
        if not self._owner:
            self.release()

    def move_to_front(self, seq_ids: list[str]) -> None:
        """Swap rows so ``seq_ids`` occupy rows ``0 .. len-1`` in that order."""
        for target, seq_id in enumerate(seq_ids):
            row = self._row_of[seq_id]
            if row != target:
                self._swap_rows(row, target)

    def advance(self, seq_id: str, num_tokens: int) -> None:
        self._lengths[self._row_of[seq_id]] += num_tokens

    # --- tensors ----------------------------------------------------------------------------
    def ensure_capacity(self, rows: int, length: int) -> None:
        """Make room for ``rows`` rows of ``length`` tokens; shrink when far too big."""
        need_rows = _round_up(max(rows, 1), self.row_align)
        need_len = _round_up(max(length, 1), self.len_align)
        grow = need_rows > self.rows_cap or need_len > self.len_cap
        shrink = self.rows_cap * self.len_cap > 2 * need_rows * need_len and (
            self.len_cap - need_len >= 4 * self.len_align or self.rows_cap - need_rows >= 16
        )
        if grow or shrink:
            self._reallocate(need_rows, need_len)

    def release(self) -> None:
        """Drop the tensors (the batch is empty)."""
        self.keys, self.values = [], []
        self.rows_cap = self.len_cap = 0

    def _reallocate(self, rows_cap: int, len_cap: int) -> None:
        s = self.shape
        size = (rows_cap, s.num_kv_heads, len_cap, s.head_dim)
        keep_rows = min(self.num_rows, self.rows_cap)
        keep_len = min(max(self._lengths, default=0), len_cap)
        new_keys, new_values = [], []
        for layer in range(s.num_layers):
            k = torch.zeros(size, dtype=s.dtype, device=s.device)
            v = torch.zeros(size, dtype=s.dtype, device=s.device)
            if self.keys and keep_rows and keep_len:
                k[:keep_rows, :, :keep_len] = self.keys[layer][:keep_rows, :, :keep_len]
                v[:keep_rows, :, :keep_len] = self.values[layer][:keep_rows, :, :keep_len]
            new_keys.append(k)
            new_values.append(v)
            if self.keys:  # free the old layer at once: peak memory is one layer more
                self.keys[layer] = self.values[layer] = torch.empty(0)
        self.keys, self.values = new_keys, new_values
        self.rows_cap, self.len_cap = rows_cap, len_cap

    def _move_row(self, src: int, dst: int) -> None:
        n = self._lengths[src]
        if self.keys and n:
            for k, v in zip(self.keys, self.values, strict=True):
                k[dst, :, :n] = k[src, :, :n]
                v[dst, :, :n] = v[src, :, :n]
        seq_id = self._owner[src]
        self._owner[dst] = seq_id
        self._lengths[dst] = n
        self._row_of[seq_id] = dst

    def _swap_rows(self, a: int, b: int) -> None:
        n = max(self._lengths[a], self._lengths[b])
        if self.keys and n:
            for k, v in zip(self.keys, self.values, strict=True):
                k[[a, b], :, :n] = k[[b, a], :, :n]
                v[[a, b], :, :n] = v[[b, a], :, :n]
        owner_a, owner_b = self._owner[a], self._owner[b]
        self._owner[a], self._owner[b] = owner_b, owner_a
        self._lengths[a], self._lengths[b] = self._lengths[b], self._lengths[a]
        self._row_of[owner_a], self._row_of[owner_b] = b, a


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
