"""Speculative decoding by prompt lookup (n-gram proposals, no draft model).

A decoding row whose last ``n`` tokens (prompt + output) occurred earlier proposes the up
to ``k`` tokens that followed that occurrence (vLLM's ``ngram`` method, transformers'
``prompt_lookup_num_tokens``). The engine feeds the row's last token and the proposal as
one chunk (positions ``num_cached .. num_cached + k``) in the step's batched forward pass,
so ``k + 1`` logits come back for one pass over the weights.

Acceptance (``accept``): the sampler picks a target token at every position exactly as a
plain decode step would (same logit processing, the row's own uniform for that position);
proposed tokens are accepted while they equal the target's pick, and the first pick that
differs (or the pick after the last proposal) is emitted too. For greedy rows this is the
exact-match rule. For sampled rows it is the standard rejection-sampling rule for a
deterministic proposal (``q`` a point mass on ``d``): ``d`` is accepted with probability
``p(d)``, and on rejection the emitted token is distributed as ``p`` without ``d``,
renormalized. Because one uniform is used per emitted token, in order, a seeded request's
tokens are the ones it gets without speculation.

Rejected positions are rolled back by not advancing the row's length: their keys/values
stay in the row's cache past its length, masked, and are overwritten by the next step.

Under load speculation steps aside: it runs only while at most ``max_rows`` rows decode
(a verification pass of ``k + 1`` tokens a row costs about one decode step while the step
is bound by reading the weights, and about ``k + 1`` once it is bound by arithmetic).
Rows with penalties or a grammar (their logits depend on the tokens before each position)
and rows still under ``min_tokens`` decode without speculation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from worker.engine.sequence import Sequence

SpeculativeMethod = Literal["off", "ngram"]
SPECULATIVE_METHODS: tuple[SpeculativeMethod, ...] = ("off", "ngram")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: SpeculativeMethod = "off"
    num_tokens: int = 4  # k: the most tokens proposed per row and step
    ngram_max: int = 3  # the longest suffix matched
    ngram_min: int = 1  # the shortest suffix matched
    max_rows: int = 4  # speculate only while at most this many rows decode

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose from "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        if self.num_tokens < 1 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("speculative decoding needs num_tokens >= 1 and "
                             "1 <= ngram_min <= ngram_max")

    @property
    def enabled(self) -> bool:
        return self.method != "off"


def propose_ngram(tokens: list[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix
    of ``tokens`` (``ngram_max`` down to ``ngram_min`` tokens long) that occurs earlier."""
    total = len(tokens)
    if k < 1 or total < ngram_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, total - 1), ngram_min - 1, -1):
        suffix = arr[total - n:]
        # candidate starts 0 .. total - n - 1 (the suffix itself excluded), latest first
        hits = np.flatnonzero(arr[:total - n] == suffix[0])
        for start in hits[::-1]:
            start = int(start)
            if n == 1 or np.array_equal(arr[start:start + n], suffix):
                follow = tokens[start + n:start + n + k]
                if follow:
                    return follow
    return []


class NgramSpeculator:
    """Chooses which decoding rows speculate this step and counts proposals/acceptances."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.num_proposed = 0  # proposed tokens verified
        self.num_accepted = 0  # of those, accepted
        self.num_steps = 0  # steps that verified at least one proposal

    def eligible(self, seq: Sequence, max_context: int) -> int:
        """How many tokens ``seq`` may propose now (0: it decodes plainly)."""
        p = seq.params
        if not p.speculative or p.has_penalties or seq.matcher is not None \
                or seq.num_output_tokens < p.min_tokens:
            return 0
        # the pick after the last proposal is emitted too: keep within max_tokens, context
        room = min(p.max_tokens - seq.num_output_tokens, max_context - seq.num_tokens) - 1
        return max(0, min(self.config.num_tokens, room))

    def propose(self, decodes: list[Sequence], max_context: int) -> dict[str, list[int]]:
        """Proposals for this step's decoding rows (none when too many rows decode)."""
        cfg = self.config
        if not cfg.enabled or not decodes or len(decodes) > cfg.max_rows:
            return {}
        out: dict[str, list[int]] = {}
        for seq in decodes:
            k = self.eligible(seq, max_context)
            if k:
                draft = propose_ngram(seq.prompt_token_ids + seq.output_token_ids, k,
                                      cfg.ngram_max, cfg.ngram_min)
                if draft:
                    out[seq.id] = draft
        if out:
            self.num_steps += 1
        return out

    def record(self, proposed: int, accepted: int) -> None:
        self.num_proposed += proposed
        self.num_accepted += accepted


def accepted_run(draft: list[int], targets: list[int]) -> list[int]:
    """The tokens a verified row emits: the target's picks up to and including the first
    that differs from the proposal (all ``len(draft) + 1`` when every proposal matches)."""
    for j, token in enumerate(draft):
        if targets[j] != token:
            return targets[:j + 1]
    return targets[:len(draft) + 1]
