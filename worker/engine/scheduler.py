"""Iteration-level scheduling: who decodes and which prompt chunks prefill this step.

Policy, no tensors and no I/O (vLLM's ``schedule()`` / ``update`` contract):
- every running sequence that has finished its prompt decodes one token each step;
- prompt tokens are prefilled in chunks under ``max_prefill_tokens`` per step, from
  ``num_cached`` (a prefix-cache hit, copied in at admission through ``on_admit``, is neither
  prefilled again nor charged to the budget), partially prefilled sequences first, then
  waiting ones in arrival order, so a long prompt is spread over several steps instead of
  stalling everyone's decoding;
- a waiting sequence is admitted only while the batch stays within ``max_batch_size`` rows
  and ``rows x longest reservation <= max_batch_tokens`` (a reservation is prompt +
  max_tokens, capped at the context). Reserving up front means a running sequence never
  has to be preempted. The queue is first-come first-served within a priority (the lane:
  interactive before batch): a request that does not fit waits at the head until the batch
  drains enough for it. Batch-lane sequences leave ``reserve_rows`` rows (at the current
  longest reservation) free, so an interactive request that arrives while a batch job fills
  the worker is admitted at the next step instead of waiting for a batch row to finish.
- a waiting sequence for which ``should_wait`` says so (the engine: its next prompt blocks
  are being prefilled by a running row, worker/engine/prefix_inflight.py) is skipped for
  this step and keeps its place at the head; the sequences behind it are considered as if
  it were not there (it takes no row and no budget), so a burst sharing a prefix computes
  it once and the rest of the queue is not held up.

Two policies (``SchedulerConfig.policy``, ``TOKENFLEET_SCHEDULING``):
- ``mixed`` (chunked prefill, as vLLM v1 and Sarathi-Serve): every step decodes every
  running row and packs prompt chunks beside them;
- ``phase`` (phase alignment, as TGI and vLLM v0 by default): a step is either prefill-only
  or decode-only. While a prompt is unfinished or a waiting request can be admitted, the
  step prefills (the same budget, the same admission rule) and every decoding row pauses;
  otherwise it decodes all rows. Requests that arrive together therefore enter decode
  together. ``phase_max_prefill_steps`` bounds the stall: after that many prefill-only
  steps in a row while rows wait to decode, one decode-only step runs (0: no bound), so a
  burst of long prompts delays each stream by at most that many prefill passes per token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from worker.engine.sequence import Sequence, SequenceStatus

SchedulingPolicy = Literal["mixed", "phase"]
SCHEDULING_POLICIES: tuple[SchedulingPolicy, ...] = ("mixed", "phase")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int = 64
    max_batch_tokens: int = 32768
    max_prefill_tokens: int = 512
    max_context: int = 2048
    policy: SchedulingPolicy = "mixed"
    # rows (and their share of max_batch_tokens) that only priority-0 (interactive)
    # sequences may take, so one arriving during a batch job starts at the next step
    reserve_rows: int = 0
    # phase: most prefill-only steps in a row while decoding rows wait (0: no bound)
    phase_max_prefill_steps: int = 0


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.seq.num_prompt_tokens


@dataclass(slots=True)
class SchedulerOutput:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # need a cache row now

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig,
                 on_admit: Callable[[Sequence], None] | None = None,
                 should_wait: Callable[[Sequence], bool] | None = None) -> None:
        if config.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"unknown scheduling policy {config.policy!r}; choose from "
                             f"{', '.join(SCHEDULING_POLICIES)}")
        self.config = config
        # called as a sequence joins the batch, before its first chunk is cut: the engine
        # gives it a cache row there and copies a cached prefix in (``num_cached`` grows)
        self.on_admit = on_admit
        # asked about each waiting sequence before it is admitted: True holds it back a step
        self.should_wait = should_wait
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._prefill_streak = 0  # phase: prefill-only steps in a row with decoders paused

    # --- queue --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.reserved_len = min(seq.num_prompt_tokens + seq.params.max_tokens,
                               self.config.max_context)
        if seq.reserved_len * seq.params.n > self.config.max_batch_tokens:
            raise ValueError(
                f"request needs {seq.reserved_len * seq.params.n} cache tokens, more than "
                f"max_batch_tokens ({self.config.max_batch_tokens})")
        # by priority, then arrival: an interactive request overtakes waiting batch ones
        index = len(self.waiting)
        while index > 0 and self.waiting[index - 1].priority > seq.priority:
            index -= 1
        self.waiting.insert(index, seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def reserved_tokens(self) -> int:
        """Cache tokens the running batch may need at most (padded to its longest row)."""
        longest = max((s.reserved_len for s in self.running), default=0)
        return len(self.running) * longest

    # --- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.config.policy == "phase":
            return self._schedule_phase()
        out = SchedulerOutput()
        budget = self.config.max_prefill_tokens
        for seq in self.running:
            if not seq.is_prefilling:
                out.decodes.append(seq)
            elif budget > 0:
                budget -= self._chunk(out, seq, budget)
        self._admit(out, budget)
        return out

    def _schedule_phase(self) -> SchedulerOutput:
        """Prefill-only while there is prompt work that can run, else decode-only; a decode
        step after ``phase_max_prefill_steps`` prefill-only steps that paused decoders."""
        out = SchedulerOutput()
        decoders = [seq for seq in self.running if not seq.is_prefilling]
        bound = self.config.phase_max_prefill_steps
        if decoders and bound and self._prefill_streak >= bound:
            self._prefill_streak = 0
            out.decodes = decoders
            return out
        budget = self.config.max_prefill_tokens
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                budget -= self._chunk(out, seq, budget)
        self._admit(out, budget)
        if not out.prefills:
            self._prefill_streak = 0
            out.decodes = decoders
        elif decoders:
            self._prefill_streak += 1
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Waiting sequences in arrival order, while the budgets allow (first come first
        served), past those ``should_wait`` holds back (they keep their places)."""
        held: list[Sequence] = []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if self.should_wait is not None and self.should_wait(seq):
                held.append(self.waiting.popleft())
                continue
            if not self._fits(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.admitted.append(seq)
            if self.on_admit is not None:
                self.on_admit(seq)
            budget -= self._chunk(out, seq, budget)
        self.waiting.extendleft(reversed(held))

    def _chunk(self, out: SchedulerOutput, seq: Sequence, budget: int) -> int:
        length = min(seq.num_prompt_tokens - seq.num_cached, budget)
        out.prefills.append(ScheduledChunk(seq, seq.num_cached, length))
        return length

    def _fits(self, seq: Sequence) -> bool:
        rows = len(self.running) + seq.params.n  # n > 1: its choices fork after the prefill
        if seq.priority > 0:  # leave the reserve free for interactive arrivals
            rows += min(self.config.reserve_rows, self.config.max_batch_size - 1)
        if rows > self.config.max_batch_size:
            return False
        longest = max([seq.reserved_len, *(s.reserved_len for s in self.running)])
        return rows * longest <= self.config.max_batch_tokens
