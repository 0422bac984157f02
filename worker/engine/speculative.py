"""Speculative decoding: prompt lookup (n-gram proposals) or a draft model, one verifier.

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

Under load speculation steps aside (a verification pass of ``k + 1`` tokens a row costs
about one decode step while the step is bound by reading the weights, and about ``k + 1``
once it is bound by arithmetic, so only well-accepted proposals pay in a full batch): a row
speculates among B decoding rows only while its own acceptance reaches the least
acceptance measured to pay at B (``STEP_ASIDE``), and never above the last B measured to
pay; above ``PROBE_ROWS`` rows only on evidence (``EVIDENCE_TOKENS`` of its proposals
verified, gathered while the batch was small). ``max_rows`` replaces this by a plain row limit.

How many tokens a row proposes adapts to it (in the spirit of transformers' "heuristic"
schedule for assisted generation, faster both ways): a row starts at ``num_tokens``; a
proposal accepted whole doubles its ``k`` (up to ``max_num_tokens``), one rejected at
position j sets it to j + 1 (its accepted run and one more; at least 1, and below the
``k`` it had). A row copying its prompt soon proposes long runs, and one past the end of what
it copies soon proposes one token, whose verification costs next to nothing.

``draft`` (worker/engine/draft.py) proposes with a draft model or the target's first
layers instead of the n-gram lookup; verification and acceptance are the same.
Rows with penalties or a grammar (their logits depend on the tokens before each position)
and rows still under ``min_tokens`` decode without speculation.
"""

from __future__ import annotations

from collections.abc import Sequence as Sequence_
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from worker.engine.sequence import Sequence

SpeculativeMethod = Literal["off", "ngram", "draft"]
SPECULATIVE_METHODS: tuple[SpeculativeMethod, ...] = ("off", "ngram", "draft")

# When speculation pays, per method: (most decoding rows, least acceptance) steps. A row
# speculates in a step of B decoding rows only if B is within a step's row count and the
# row's own acceptance so far (``ACCEPTANCE_PRIOR`` counted as accepted) reaches that
# step's acceptance; above the last row count never. Measured on this 2-core AVX-512 CPU
# with SmolLM2-135M bf16, k = 4 (bench/data/spec_crossover.json, docs/design/engine.md
# "Where speculation stops paying"): n-gram on the copy workload (87 % accepted) paid
# 1.76x/1.34x/1.04x/0.95x at 4/8/16/32 rows, on chat (10-18 %) 0.62x/0.48x/0.44x; the
# least acceptance is where the line between the two crosses 1.0x. The self-draft (1-4 %
# accepted) never paid; a draft model was not measured, so it is kept to one row.
STEP_ASIDE: dict[str, tuple[tuple[int, float], ...]] = {
    "off": (),
    "ngram": ((1, 0.0), (4, 0.41), (8, 0.56), (16, 0.82)),
    "draft": ((1, 0.0),),
}
ACCEPTANCE_PRIOR = 2  # tokens a row is credited as proposed and accepted before it starts
# Above PROBE_ROWS decoding rows a row speculates only on evidence: at least this many of its
# proposed tokens verified (a probe there costs a verification chunk for little chance).
PROBE_ROWS = 4
EVIDENCE_TOKENS = 8


def min_acceptance(method: str, rows: int) -> float | None:
    """The acceptance a row needs to speculate among ``rows`` decoding rows (None: never)."""
    for limit, acceptance in STEP_ASIDE[method]:
        if rows <= limit:
            return acceptance
    return None


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: SpeculativeMethod = "off"
    num_tokens: int = 4  # k: the tokens a row proposes per step at first
    # the most a row's k grows to while its proposals are accepted whole (0: num_tokens,
    # i.e. k stays fixed)
    max_num_tokens: int = 0
    ngram_max: int = 3  # the longest suffix matched
    ngram_min: int = 1  # the shortest suffix matched
    # speculate only while at most this many rows decode, whatever the acceptance (None: the
    # measured STEP_ASIDE steps of the method)
    max_rows: int | None = None
    draft_layers: int = 8  # self-draft (no draft runner given): the target's first layers

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose from "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        if self.num_tokens < 1 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("speculative decoding needs num_tokens >= 1 and "
                             "1 <= ngram_min <= ngram_max")
        if self.max_num_tokens < 0:
            raise ValueError("speculative max_num_tokens must be >= 0 (0: num_tokens)")

    @property
    def ceiling(self) -> int:
        """The most tokens a row may propose in a step."""
        return max(self.num_tokens, self.max_num_tokens)

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def min_acceptance(self, rows: int) -> float | None:
        """The acceptance a row needs to speculate among ``rows`` decoding rows."""
        if self.max_rows is not None:
            return 0.0 if rows <= self.max_rows else None
        return min_acceptance(self.method, rows)


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


class Proposer(Protocol):
    def propose(self, rows: Sequence_[tuple[Sequence, int]]) -> dict[str, list[int]]:
        """Up to ``k`` proposed tokens for each ``(sequence, k)``."""

    def forget(self, seq_id: str) -> None:
        """The sequence left the engine."""


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def propose(self, rows: Sequence_[tuple[Sequence, int]]) -> dict[str, list[int]]:
        cfg = self.config
        out: dict[str, list[int]] = {}
        for seq, k in rows:
            draft = propose_ngram(seq.prompt_token_ids + seq.output_token_ids, k,
                                  cfg.ngram_max, cfg.ngram_min)
            if draft:
                out[seq.id] = draft
        return out

    def forget(self, seq_id: str) -> None:
        pass


class Speculator:
    """Chooses which decoding rows speculate this step, asks the method's proposer for
    their proposals, and counts proposals/acceptances."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        self.proposer: Proposer = proposer or NgramProposer(config)
        self.num_proposed = 0  # proposed tokens verified
        self.num_accepted = 0  # of those, accepted
        self.num_steps = 0  # steps that verified at least one proposal
        self._rows: dict[str, tuple[int, int]] = {}  # per row: proposed, accepted
        self._k: dict[str, int] = {}  # per row: its k now, where it differs from num_tokens

    def eligible(self, seq: Sequence, max_context: int) -> int:
        """How many tokens ``seq`` may propose now (0: it decodes plainly)."""
        p = seq.params
        if not p.speculative or p.has_penalties or seq.matcher is not None \
                or seq.num_output_tokens < p.min_tokens:
            return 0
        # the pick after the last proposal is emitted too: keep within max_tokens, context
        room = min(p.max_tokens - seq.num_output_tokens, max_context - seq.num_tokens) - 1
        return max(0, min(self.tokens_for(seq.id), room))

    def tokens_for(self, seq_id: str) -> int:
        """The row's k now: ``num_tokens`` at first, adapted to its acceptance since."""
        return self._k.get(seq_id, self.config.num_tokens)

    def propose(self, decodes: list[Sequence], max_context: int) -> dict[str, list[int]]:
        """Proposals for this step's decoding rows (none when too many rows decode)."""
        cfg = self.config
        if not cfg.enabled or not decodes:
            return {}
        need = cfg.min_acceptance(len(decodes))
        if need is None:
            return {}
        probe = len(decodes) <= PROBE_ROWS or cfg.max_rows is not None
        rows = [(seq, k) for seq in decodes
                if (probe or self._rows.get(seq.id, (0, 0))[0] >= EVIDENCE_TOKENS)
                and self.acceptance(seq.id) >= need
                and (k := self.eligible(seq, max_context))]
        out = self.proposer.propose(rows) if rows else {}
        if out:
            self.num_steps += 1
        return out

    def acceptance(self, seq_id: str) -> float:
        """The row's share of proposed tokens accepted, ``ACCEPTANCE_PRIOR`` included."""
        proposed, accepted = self._rows.get(seq_id, (0, 0))
        return (accepted + ACCEPTANCE_PRIOR) / (proposed + ACCEPTANCE_PRIOR)

    def forget(self, seq_id: str) -> None:
        self._rows.pop(seq_id, None)
        self._k.pop(seq_id, None)
        self.proposer.forget(seq_id)

    def record(self, seq_id: str, proposed: int, accepted: int) -> None:
        self.num_proposed += proposed
        self.num_accepted += accepted
        before = self._rows.get(seq_id, (0, 0))
        self._rows[seq_id] = (before[0] + proposed, before[1] + accepted)
        if proposed and self.config.ceiling > self.config.num_tokens:
            k = self.tokens_for(seq_id)
            self._k[seq_id] = (min(2 * k, self.config.ceiling) if accepted == proposed
                               else max(1, min(k - 1, accepted + 1)))


def accepted_run(draft: list[int], targets: list[int]) -> list[int]:
    """The tokens a verified row emits: the target's picks up to and including the first
    that differs from the proposal (all ``len(draft) + 1`` when every proposal matches)."""
    for j, token in enumerate(draft):
        if targets[j] != token:
            return targets[:j + 1]
    return targets[:len(draft) + 1]
