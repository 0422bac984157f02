"""Row-slot KV cache: one contiguous ``[rows, kv_heads, len_cap, head_dim]`` buffer per layer.

Each running sequence owns one row; its token ``i`` sits at position ``i``. A freed row
stays a hole that the next sequence takes (lowest first), so a batch that turns over copies
nothing; a step's decode rows are brought to the prefix ``[:batch]`` (``gather_front``,
moving only newcomers) so a decode step works on it with no gather. Holes are compacted
only when the buffer would otherwise outgrow ``token_budget``, or when more than half the
rows in use are holes (the span shrinks). The buffer is attended in full
(positions past a row's length are masked), because on CPU a matmul over a contiguous
buffer is several times faster than over a strided slice of it; ``len_cap`` therefore
tracks the longest row closely: it grows and shrinks in ``len_align`` steps. Rows are
padded to ``row_align`` and lengths to ``len_align`` only while the padded buffer stays
within ``token_budget``, so with the scheduler keeping ``rows x longest reservation`` under
the budget, ``allocated_tokens <= token_budget`` always (see docs/design/engine.md).

A reallocation allocates every new layer before it lets go of the old ones: if it fails
(out of memory), the old buffers, capacities and rows are untouched and still usable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class RowKVCache:
    """Owns the key/value tensors and which sequence sits in which row."""

    def __init__(self, shape: CacheShape, *, row_align: int = 4, len_align: int = 64,
                 token_budget: int | None = None) -> None:
        self.shape = shape
        self.row_align = row_align
        self.len_align = len_align
        self.token_budget = token_budget  # padding never takes the buffer past it
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows_cap = 0
        self.len_cap = 0
        self._row_of: dict[str, int] = {}
        self._owner: list[str | None] = []  # row -> sequence id (None: a hole)
        self._lengths: list[int] = []  # row -> tokens written (0 for a hole)
        self._holes = 0

    # --- bookkeeping ------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Rows spanned: the highest row in use + 1 (holes below it included)."""
        return len(self._owner)

    @property
    def num_sequences(self) -> int:
        return len(self._owner) - self._holes

    def row_of(self, seq_id: str) -> int:
        return self._row_of[seq_id]

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
        """Give ``seq_id`` the lowest free row (empty; capacity is ensured separately)."""
        if seq_id in self._row_of:
            raise ValueError(f"sequence {seq_id} already has a row")
        row = self._next_row()
        if row == len(self._owner):
            self._owner.append(seq_id)
            self._lengths.append(0)
        else:
            self._owner[row] = seq_id
            self._holes -= 1
        self._row_of[seq_id] = row
        return row

    def _next_row(self) -> int:
        return self._owner.index(None) if self._holes else len(self._owner)

    def fork(self, src_id: str, dst_id: str) -> None:
        """Give ``dst_id`` a new row holding a copy of ``src_id``'s keys and values (n > 1:
        the choices of one prompt share its prefill). Capacity is ensured first."""
        length = self._lengths[self._row_of[src_id]]
        row = self.allocate(dst_id)
        try:
            self.ensure_capacity(self.num_rows, length)
        except BaseException:
            self.free(dst_id)
            raise
        row = self._row_of[dst_id]  # a compaction may have moved it
        src = self._row_of[src_id]
        if self.keys and length:
            for k, v in zip(self.keys, self.values, strict=True):
                k[row, :, :length] = k[src, :, :length]
                v[row, :, :length] = v[src, :, :length]
        self._lengths[row] = length

    def free(self, seq_id: str) -> None:
        """Release a row: it becomes a hole (nothing is copied). Holes at the end are
        dropped; when more than half the span is holes, the last rows move into them. An
        empty cache keeps its buffers for the next batch: a batch that turns over whole
        (closed-loop clients asking the same length) would otherwise allocate and zero
        them again at once (45 ms of a step at 32 rows x 256 for SmolLM2); the owner hands
        them back with ``release`` once it has been idle (``LLMEngine.release_idle_memory``)."""
        row = self._row_of.pop(seq_id)
        self._owner[row] = None
        self._lengths[row] = 0
        self._holes += 1
        self._drop_trailing_holes()
        if 2 * self._holes > len(self._owner):
            self._compact()

    def _drop_trailing_holes(self) -> None:
        while self._owner and self._owner[-1] is None:
            self._owner.pop()
            self._lengths.pop()
            self._holes -= 1

    def _compact(self) -> None:
        """Move the last rows into the holes until there are none."""
        while self._holes:
            self._move_row(len(self._owner) - 1, self._owner.index(None))
            self._drop_trailing_holes()

    def move_to_front(self, seq_ids: list[str]) -> None:
        """Rows so ``seq_ids`` occupy rows ``0 .. len-1`` in that order."""
        for target, seq_id in enumerate(seq_ids):
            row = self._row_of[seq_id]
            if row != target:
                self._swap_rows(row, target)

    def gather_front(self, seq_ids: list[str]) -> list[str]:
        """Bring ``seq_ids`` into rows ``0 .. len-1`` in whatever order moves the fewest rows
        (a member already there stays; each one past the front swaps with a non-member
        inside it), and return them in row order. A step's decode rows change as requests
        finish and join; putting them in a given order cost a swap (3.2 ms for 60 buffers
        of 220 positions on the AMX Xeon) for nearly every row each time a batch turned
        over, where this moves only the newcomers."""
        n = len(seq_ids)
        members = set(seq_ids)
        holes = [row for row in range(n) if self._owner[row] not in members]
        outside = sorted(row for sid in seq_ids if (row := self._row_of[sid]) >= n)
        for hole, row in zip(holes, outside, strict=True):
            self._swap_rows(row, hole)  # a move where the hole is free
        self._drop_trailing_holes()
        return [sid for sid in self._owner[:n] if sid is not None]

    def advance(self, seq_id: str, num_tokens: int) -> None:
        self._lengths[self._row_of[seq_id]] += num_tokens

    def truncate(self, seq_id: str, length: int) -> None:
        """Roll a row back to its first ``length`` tokens (speculative drafts): later
        positions are masked by the row's length and overwritten by later writes."""
        row = self._row_of[seq_id]
        if not 0 <= length <= self._lengths[row]:
            raise ValueError(f"cannot truncate {seq_id} from {self._lengths[row]} to {length}")
        self._lengths[row] = length

    # --- tensors ----------------------------------------------------------------------------
    def ensure_capacity(self, rows: int, length: int) -> None:
        """Make room for ``rows`` rows of ``length`` tokens (never less than the longest row
        already written); shrink when far too big. A failed shrink keeps the old buffers."""
        length = max(length, max(self._lengths, default=0), 1)
        if (self._holes and self.token_budget is not None
                and max(rows, self.num_rows) * length > self.token_budget):
            spanned = self.num_rows
            self._compact()  # rows the caller counted as spanned are now in the holes
            rows -= spanned - self.num_rows
        rows = max(rows, self.num_rows, 1)
        target_rows, target_len = self._padded(rows, length)
        if rows > self.rows_cap or length > self.len_cap:
            self._reallocate(target_rows, target_len)
        elif self.rows_cap * self.len_cap > 2 * target_rows * target_len and (
                self.len_cap - target_len >= 4 * self.len_align
                or self.rows_cap - target_rows >= 16):
            try:
                self._reallocate(target_rows, target_len)
            except (RuntimeError, MemoryError) as exc:  # the bigger buffers are still good
                log.warning("shrinking the KV cache failed, keeping it as is: %r", exc)

    def _padded(self, rows: int, length: int) -> tuple[int, int]:
        """Capacities for ``rows x length``, padded to the alignments while within budget."""
        padded_rows = _round_up(rows, self.row_align)
        padded_len = _round_up(length, self.len_align)
        budget = self.token_budget
        if budget is None or padded_rows * padded_len <= budget:
            return padded_rows, padded_len
        if rows * padded_len <= budget:
            return rows, padded_len
        return rows, max(length, budget // rows)

    def release(self) -> None:
        """Drop the tensors; only an empty cache may (it raises otherwise)."""
        if self._row_of:
            raise RuntimeError(f"cannot release a KV cache holding {len(self._row_of)} rows")
        self.keys, self.values = [], []
        self.rows_cap = self.len_cap = 0

    def _reallocate(self, rows_cap: int, len_cap: int) -> None:
        """New buffers with the rows' data copied in. Every new layer is allocated before any
        old one is dropped, so a failure leaves the cache exactly as it was."""
        s = self.shape
        size = (rows_cap, s.num_kv_heads, len_cap, s.head_dim)
        # never inference tensors (the step may be inside inference_mode): a compiled step's
        # guards see one kind of tensor whoever grows the cache (compiled_step.py)
        with torch.inference_mode(False):
            new_keys = [torch.zeros(size, dtype=s.dtype, device=s.device)
                        for _ in range(s.num_layers)]
            new_values = [torch.zeros(size, dtype=s.dtype, device=s.device)
                          for _ in range(s.num_layers)]
        keep_rows = min(self.num_rows, self.rows_cap, rows_cap)
        keep_len = min(max(self._lengths, default=0), len_cap, self.len_cap)
        if self.keys and keep_rows and keep_len:
            for old, new in zip(self.keys + self.values, new_keys + new_values, strict=True):
                new[:keep_rows, :, :keep_len] = old[:keep_rows, :, :keep_len]
        self.keys, self.values = new_keys, new_values
        self.rows_cap, self.len_cap = rows_cap, len_cap

    def _move_row(self, src: int, dst: int) -> None:
        """Row ``src`` into the hole ``dst``; ``src`` becomes a hole."""
        n = self._lengths[src]
        if self.keys and n:
            for k, v in zip(self.keys, self.values, strict=True):
                k[dst, :, :n] = k[src, :, :n]
                v[dst, :, :n] = v[src, :, :n]
        seq_id = self._owner[src]
        assert seq_id is not None and self._owner[dst] is None
        self._owner[dst], self._owner[src] = seq_id, None
        self._lengths[dst], self._lengths[src] = n, 0
        self._row_of[seq_id] = dst

    def _swap_rows(self, a: int, b: int) -> None:
        """Slice copies through one scratch row: 2.5-3x faster than an advanced-index
        gather and scatter (``k[[a, b]] = k[[b, a]]``; 5.3 against 13.5-16.8 ms for 60
        buffers of 300 positions, measured on a 2-core EPYC), and a step may swap several.
        With a hole on either side it is a move."""
        if self._owner[a] is None or self._owner[b] is None:
            src, dst = (a, b) if self._owner[b] is None else (b, a)
            if self._owner[src] is not None:
                self._move_row(src, dst)
            return
        n = max(self._lengths[a], self._lengths[b])
        if self.keys and n:
            scratch = torch.empty_like(self.keys[0][a, :, :n])
            for t in self.keys + self.values:
                scratch.copy_(t[a, :, :n])
                t[a, :, :n] = t[b, :, :n]
                t[b, :, :n] = scratch
        owner_a, owner_b = self._owner[a], self._owner[b]
        self._owner[a], self._owner[b] = owner_b, owner_a
        self._lengths[a], self._lengths[b] = self._lengths[b], self._lengths[a]
        self._row_of[owner_a], self._row_of[owner_b] = b, a


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
