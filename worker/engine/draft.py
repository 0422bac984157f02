"""Draft-model proposals for speculative decoding (``TOKENFLEET_SPECULATIVE=draft``).

A draft is a second model runner with its own KV cache (its own rows, one per speculating
sequence, in the same engine): either a small model with the target's tokenizer
(``TOKENFLEET_DRAFT_MODEL``, a local Hugging Face directory), or a *self-draft*: the target's
first ``TOKENFLEET_DRAFT_LAYERS`` layers followed by its final norm and lm_head (LayerSkip's
early exit, without LayerSkip's training, so its acceptance is what an untrained early exit
gets; docs/design/engine.md has the figures).

Each step, for the rows that speculate (``DraftProposer.propose``):
1. **catch up**: the draft row holds keys/values for a prefix of the sequence (``fed``);
   the tokens after the longest prefix still equal to the sequence's (the last accepted
   run's bonus token, or the whole prompt the first time) go in as one prefill chunk per row,
   whose last logits give the first proposal;
2. **draft**: ``k - 1`` batched decode steps of the draft, greedy, each feeding the previous
   proposal.
Proposals are the draft's argmax, so a sampled row's proposal is a deterministic token and
the engine's acceptance rule (accept ``d`` with probability ``p(d)``, else sample ``p``
without ``d``) is the standard rejection-sampling rule for it: outputs are distributed as
without speculation, and greedy outputs are identical. Rejected proposals are rolled back in
the draft's cache by the next catch-up (the row is cut back to the verified prefix).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence as Seq

import torch

from worker.engine.kv_cache import RowKVCache
from worker.engine.model_runner import ModelRunner, PrefillChunk, TransformerRunner
from worker.engine.sequence import Sequence


def early_exit_runner(target: TransformerRunner, num_layers: int) -> TransformerRunner:
    """The target's first ``num_layers`` layers, then its final norm and lm_head, sharing
    the target's weights (no copy) with a KV cache of its own."""
    total = len(target.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"a self-draft takes 1 .. {total} of the model's layers; "
                         f"got {num_layers}")
    draft = copy.copy(target)
    draft.layers = target.layers[:num_layers]
    draft.fused = target.fused[:num_layers]
    draft.cache = RowKVCache(dataclasses.replace(target.cache.shape, num_layers=num_layers))
    return draft


def _common_prefix(a: list[int], b: list[int], start: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, known to be at least ``start``."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftProposer:
    """Greedy proposals from a draft runner; keeps one draft cache row per sequence."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.cache = runner.cache
        self._fed: dict[str, list[int]] = {}  # tokens whose keys/values the draft row holds
        self._verified: dict[str, int] = {}  # of those, known equal to the sequence's

    def forget(self, seq_id: str) -> None:
        """The sequence finished: free its draft row."""
        self._verified.pop(seq_id, None)
        if self._fed.pop(seq_id, None) is not None and seq_id in self.cache:
            self.cache.free(seq_id)
            if not self.cache.num_sequences:
                self.cache.release()  # the draft's buffers go as soon as no row drafts

    def propose(self, rows: Seq[tuple[Sequence, int]]) -> dict[str, list[int]]:
        """Up to ``k`` greedy draft tokens for each ``(sequence, k)``."""
        rows = [(s, k) for s, k in rows if k > 0]
        if not rows:
            return {}
        chunks_for: list[tuple[Sequence, int, list[int]]] = []
        longest = 0
        for seq, k in rows:
            tokens = seq.prompt_token_ids + seq.output_token_ids
            if seq.id not in self.cache:
                self.cache.allocate(seq.id)
                self._fed[seq.id] = []
            fed = self._fed[seq.id]
            # a sequence only grows: what matched once still matches
            keep = _common_prefix(fed, tokens, self._verified.get(seq.id, 0))
            keep = min(keep, len(tokens) - 1)
            self._truncate(seq.id, keep)
            del fed[keep:]
            chunks_for.append((seq, keep, tokens[keep:]))
            longest = max(longest, len(tokens) + k)
        self.cache.ensure_capacity(self.cache.num_rows, longest)
        logits = self.runner.prefill([
            PrefillChunk(self.cache.row_of(seq.id), start, new, True)
            for seq, start, new in chunks_for])
        picks = torch.argmax(logits, dim=-1).tolist()
        out: dict[str, list[int]] = {}
        for (seq, _, new), pick in zip(chunks_for, picks, strict=True):
            self.cache.advance(seq.id, len(new))
            self._fed[seq.id].extend(new)
            self._verified[seq.id] = len(self._fed[seq.id])
            out[seq.id] = [int(pick)]
        want = {seq.id: k for seq, k in rows}
        while True:
            active = [sid for sid, draft in out.items() if len(draft) < want[sid]]
            if not active:
                return out
            self.cache.move_to_front(active)
            positions = [len(self._fed[sid]) for sid in active]
            logits = self.runner.decode([out[sid][-1] for sid in active], positions)
            for sid, pick in zip(active, torch.argmax(logits, dim=-1).tolist(), strict=True):
                self.cache.advance(sid, 1)
                self._fed[sid].append(out[sid][-1])
                out[sid].append(int(pick))

    def _truncate(self, seq_id: str, length: int) -> None:
        """Roll the draft row back to ``length`` tokens (later keys/values are masked and
        overwritten)."""
        self.cache.truncate(seq_id, length)
