"""The engine's contract with the outside world (the queue loop, the bench, the tests).

The engine is pure Python/torch: it knows nothing of Redis. The queue loop calls
``add_request`` / ``abort_request`` between steps and ``step()`` in a loop, and turns each
``RequestOutput`` into wire events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.protocol import SamplingParams


@dataclass(slots=True)
class EngineRequest:
    id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0  # time.monotonic() when it reached the engine
    priority: int = 0  # 0 = the interactive lane; larger = later (the batch lane is 1)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (only requests with news are reported)."""

    id: str
    new_token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    first_token: bool = False  # this output carries the request's first generated token
    # per new token, when the request asked: [text, logprob, [[text, logprob], ...]]
    logprobs: list[list[Any]] = field(default_factory=list)
    index: int = 0  # the choice (n > 1)
    choice_finish_reason: str | None = None  # n > 1: this choice ended (maybe not the rest)


# the compiled decode step (worker/engine/compile_warmup.py): not asked for or not possible,
# being compiled while decode runs eager, attached, failed (eager), warm-up stopped (shutdown)
COMPILE_STATES = ("off", "warming", "active", "failed", "stopped")


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_tokens_used: int = 0
    kv_tokens_budget: int = 0
    steps: int = 0
    # automatic prefix caching (cumulative since start, except the pool's fill)
    prefix_cache_hits: int = 0  # requests that reused a cached prefix
    prefix_cache_misses: int = 0  # requests that found none (lookups with the cache on)
    prefix_cache_hit_tokens: int = 0  # prompt tokens copied instead of prefilled
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up
    prefix_cache_tokens: int = 0  # tokens held in the pool now
    prefix_cache_capacity: int = 0  # its size (TOKENFLEET_PREFIX_CACHE_TOKENS; 0 = off)
    spec_proposed: int = 0  # speculative decoding: proposed tokens verified (cumulative)
    spec_accepted: int = 0  # of those, accepted
    compiled: str = "off"  # the compiled decode step: off/warming/active/failed/stopped


class Engine(Protocol):
    """What the queue loop needs from an engine (the real one and the null one)."""

    def add_request(self, request: EngineRequest) -> None: ...

    def abort_request(self, request_id: str) -> None:
        """Remove a request wherever it is; the next step reports it finished/cancelled."""

    def has_unfinished(self) -> bool: ...

    def num_free_slots(self) -> int:
        """How many more requests the engine would like to hold (running + waiting)."""

    def release_idle_memory(self) -> None:
        """Called when no request came for a while: give back memory kept for the next."""

    def step(self) -> list[RequestOutput]: ...

    def stats(self) -> EngineStats: ...
