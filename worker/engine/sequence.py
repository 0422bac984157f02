"""A request's state inside the engine (nano-vllm's ``Sequence``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.protocol import SamplingParams


class SequenceStatus(enum.IntEnum):
    """Ordered: every status from FINISHED_STOPPED on is terminal."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_CANCELLED = 4
    FINISHED_ERROR = 5

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_CANCELLED: "cancelled",
    SequenceStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True)
class Sequence:
    """Prompt, generated tokens and progress of one request.

    ``num_cached`` counts the tokens whose keys/values are in the KV cache. While the prompt
    is being prefilled it grows chunk by chunk; once decoding, it is ``num_tokens - 1`` (the
    newest sampled token is fed at the next step).
    """

    id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0  # 0 first; see Scheduler.add and SchedulerConfig.reserve_rows
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached: int = 0
    reserved_len: int = 0  # prompt + max_tokens, capped at the context: the cache budget
    generator: torch.Generator | None = None
    error: str | None = None
    prompt_mask: torch.Tensor | None = None  # the prompt's tokens (repetition penalty)
    matcher: Any = None  # structured outputs: the grammar matcher (worker.engine.grammar)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_cached < self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        if self.output_token_ids:
            return self.output_token_ids[-1]
        return self.prompt_token_ids[-1]

    def append_token(self, token_id: int) -> None:
        """The only way tokens are added to a sequence."""
        self.output_token_ids.append(token_id)
