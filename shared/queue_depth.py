"""How much work waits for a model: per lane, what the worker group has not been given yet
(``lag``) and what it holds unacknowledged (``pending``), from ``XLEN`` + ``XINFO GROUPS``.

One definition for every reader: the gateway's 429 backpressure (``gateway.backlog``), the
metrics and the dashboard (``GET /v1/fleet``), and the autoscaler. The commands are queued
on a pipeline the caller owns, so the sync (autoscaler) and asyncio (gateway) clients share
the parsing: ``queue_commands(pipe, ...)``, execute, then ``parse_depths(model, replies)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.keys import LANES, WORKER_GROUP, Keys

NUM_COMMANDS_PER_LANE = 2


@dataclass(frozen=True, slots=True)
class LaneDepth:
    model: str
    lane: str
    lag: int  # entries the group has not delivered yet (no group yet: the stream's length)
    pending: int  # delivered to a worker, not acknowledged (running or about to run)

    @property
    def depth(self) -> int:
        """What the backlog limit and the autoscaler compare against."""
        return self.lag + self.pending


def queue_commands(pipe: Any, keys: Keys, model: str) -> None:
    """Queue ``XLEN`` and ``XINFO GROUPS`` for each lane of ``model`` on ``pipe`` (a sync or
    asyncio pipeline, executed with ``raise_on_error=False``)."""
    for lane in LANES:
        stream = keys.requests_stream(model, lane)
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)


def parse_depths(model: str, replies: Sequence[Any]) -> list[LaneDepth]:
    """The replies of ``queue_commands`` (in order) as one ``LaneDepth`` per lane."""
    depths = []
    for index, lane in enumerate(LANES):
        start = index * NUM_COMMANDS_PER_LANE
        length, groups = replies[start:start + NUM_COMMANDS_PER_LANE]
        depths.append(_lane_depth(model, lane, length, groups))
    return depths


def _lane_depth(model: str, lane: str, length: Any, groups: Any) -> LaneDepth:
    size = length if isinstance(length, int) else 0
    if not isinstance(groups, list):  # an error reply: no stream or no group yet
        return LaneDepth(model, lane, lag=size, pending=0)
    group = next((g for g in groups if _name(g) == WORKER_GROUP), None)
    if group is None:
        return LaneDepth(model, lane, lag=size, pending=0)
    lag = group.get("lag")
    return LaneDepth(model, lane, lag=int(lag) if lag is not None else 0,
                     pending=int(group.get("pending") or 0))


def _name(group: dict[str, Any]) -> str:
    name = group.get("name")
    return name.decode() if isinstance(name, bytes) else str(name)
