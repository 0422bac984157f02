"""``n > 1``: a request's choices as sequences of one group.

The request's own sequence (choice 0) is prefilled once; when its prompt is complete the
engine forks it (``fork_children``): each other choice gets a copy of its KV row and its
own seed stream (``seed + i``), and all are sampled from that step on. Their outputs are
reported under the request's id with ``index``; a choice that ends reports
``choice_finish_reason`` and the request finishes with its last choice. A choice that fails
ends the whole request (its siblings are aborted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.types import RequestOutput

_SEED_MASK = 2**64 - 1


def child_id(group_id: str, index: int) -> str:
    return f"{group_id}#{index}"


@dataclass(slots=True)
class ChoiceGroup:
    id: str
    n: int
    is_forked: bool = False
    remaining: int = 0
    tokens: list[int] = field(default_factory=list)  # output tokens per choice


class ChoiceGroups:
    def __init__(self, abort: Callable[[str], None]) -> None:
        self.groups: dict[str, ChoiceGroup] = {}
        self.member_of: dict[str, tuple[str, int]] = {}
        self._abort = abort

    def add(self, seq: Sequence) -> None:
        n = seq.params.n
        self.groups[seq.id] = ChoiceGroup(seq.id, n, remaining=n, tokens=[0] * n)
        self.member_of[seq.id] = (seq.id, 0)

    def members(self, group_id: str) -> list[str]:
        group = self.groups.get(group_id)
        return [] if group is None else [group_id] + [child_id(group_id, i)
                                                     for i in range(1, group.n)]

    def wants_fork(self, seq: Sequence) -> bool:
        group = self.groups.get(seq.id)
        return group is not None and not group.is_forked and not seq.is_prefilling

    def fork_children(self, parent: Sequence) -> list[Sequence]:
        """The other choices of ``parent``'s group, ready to decode (their KV rows are the
        caller's to copy)."""
        group = self.groups[parent.id]
        group.is_forked = True
        children = []
        for i in range(1, group.n):
            child = Sequence(child_id(parent.id, i), parent.prompt_token_ids, parent.params,
                             parent.arrival_time, status=SequenceStatus.RUNNING,
                             num_cached=parent.num_cached, reserved_len=parent.reserved_len)
            child.prompt_mask = parent.prompt_mask
            if parent.params.seed is not None and not parent.params.is_greedy:
                seed = (parent.params.seed + i) & _SEED_MASK
                child.generator = torch.Generator(device="cpu").manual_seed(seed)
            self.member_of[child.id] = (parent.id, i)
            children.append(child)
        return children

    def rewrite(self, out: RequestOutput) -> RequestOutput | None:
        """A member's output as its group's (None: the group has already ended)."""
        where = self.member_of.get(out.id)
        if where is None:
            return out
        group_id, index = where
        group = self.groups.get(group_id)
        if group is None:
            self.member_of.pop(out.id, None)
            return None
        group.tokens[index] = max(group.tokens[index], out.num_output_tokens)
        out.id, out.index = group_id, index
        out.num_output_tokens = sum(group.tokens)
        if not out.finished:
            return out
        self.member_of.pop(child_id(group_id, index) if index else group_id, None)
        out.choice_finish_reason = out.finish_reason
        group.remaining -= 1
        ends = group.remaining <= 0 or not group.is_forked or out.finish_reason == "error"
        if not ends:
            out.finished, out.finish_reason, out.error = False, None, None
            return out
        del self.groups[group_id]
        for member in [m for m, (g, _) in self.member_of.items() if g == group_id]:
            self._abort(member)  # siblings of a failed choice: their outputs are dropped
        return out
