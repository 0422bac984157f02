"""Reading requests from the lane streams of one model, as one consumer of ``WORKER_GROUP``.

Two kinds of read:
- ``read(count)``: non-blocking, exact: one Lua call reads the lanes in priority order, each
  only with the capacity the lanes before it left over, so a worker never takes more
  entries than it asked for and interactive requests go first. Every few reads where the
  interactive lane used up all the capacity, the other lanes get first pick of a small
  share, so the batch lane still moves under a steady interactive load. The later lanes
  never take the last ``reserve`` slots (``TOKENFLEET_INTERACTIVE_RESERVE``): a worker
  filled by a batch job still has room to read an interactive request at once.
- ``wait(block_ms)``: a blocking ``XREADGROUP`` over all lanes with ``COUNT 1``, used by an
  idle worker to learn that something arrived (at most one entry per lane).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis

from shared.keys import LANES, WORKER_GROUP, Keys

logger = logging.getLogger(__name__)

STARVED_READS_BEFORE_SHARE = 4  # full interactive reads before the batch lane picks first
LOW_LANE_SHARE = 4  # the batch lane then gets up to 1/4 of the capacity (at least 1)

# KEYS: lane streams in pick order. ARGV: group, consumer, total count, one cap per lane.
_READ_LANES_LUA = """
local left = tonumber(ARGV[3])
local out = {}
for i, key in ipairs(KEYS) do
  local cap = math.min(tonumber(ARGV[3 + i]), left)
  if cap > 0 then
    local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', cap,
                           'STREAMS', key, '>')
    if res then
      left = left - #res[1][2]
      out[#out + 1] = res[1]
    end
  end
end
return out
"""


@dataclass(slots=True)
class StreamEntry:
    """One request-stream entry delivered to this worker (not yet acknowledged)."""

    stream: str
    entry_id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1  # how many times the group has delivered it, this time included


def _fields_from_flat(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=False))


def entries_from_lua(result: list[Any]) -> list[StreamEntry]:
    """Entries from the Lua reply ``[[stream, [[id, [f, v, ...]], ...]], ...]``."""
    return [
        StreamEntry(stream=stream.decode(), entry_id=entry_id, fields=_fields_from_flat(flat))
        for stream, items in result
        for entry_id, flat in items
    ]


def entries_from_xread(result: list[Any]) -> list[StreamEntry]:
    """Entries from redis-py's parsed XREADGROUP reply ``[[stream, [(id, {f: v})]]]``."""
    return [
        StreamEntry(stream=stream.decode(), entry_id=entry_id, fields=dict(fields or {}))
        for stream, items in result or []
        for entry_id, fields in items
    ]


class LanePlanner:
    """Which lane picks first and how much each may take; no I/O."""

    def __init__(self, streams: list[str], reserve: int = 0) -> None:
        self.streams = streams
        self.reserve = reserve  # read slots that only the first lane may fill
        self.num_starved_reads = 0

    def plan(self, count: int) -> list[tuple[str, int]]:
        if len(self.streams) > 1 and self.num_starved_reads >= STARVED_READS_BEFORE_SHARE:
            share = max(1, count // LOW_LANE_SHARE)
            return [(s, share) for s in self.streams[1:]] + [(self.streams[0], count)]
        later = max(0, count - self.reserve)  # a worker full of batch work can still read
        return [(self.streams[0], count)] + [(s, later) for s in self.streams[1:]]

    def record(self, plan: list[tuple[str, int]], count: int, entries: list[StreamEntry]) -> None:
        """Count reads where the first lane took everything and later lanes got no turn."""
        if plan[0][0] != self.streams[0]:
            self.num_starved_reads = 0
        elif entries and all(e.stream == self.streams[0] for e in entries) and len(
                entries) >= count:
            self.num_starved_reads += 1
        else:
            self.num_starved_reads = 0


class StreamReader:
    def __init__(self, client: redis.Redis, keys: Keys, model: str, consumer: str,
                 lanes: tuple[str, ...] = LANES, reserve: int = 0) -> None:
        self.client = client
        self.consumer = consumer
        self.streams = [keys.requests_stream(model, lane) for lane in lanes]
        self.planner = LanePlanner(self.streams, reserve)
        self._read_lanes = client.register_script(_READ_LANES_LUA)

    def ensure_groups(self) -> None:
        """``XGROUP CREATE ... MKSTREAM`` on every lane; an existing group is fine."""
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
                logger.info("created consumer group %s on %s", WORKER_GROUP, stream)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def read(self, count: int) -> list[StreamEntry]:
        """Up to ``count`` new entries, interactive lane first; never blocks."""
        if count <= 0:
            return []
        plan = self.planner.plan(count)
        args: list[str | int] = [WORKER_GROUP, self.consumer, count, *(c for _, c in plan)]
        result = self._read_lanes(keys=[s for s, _ in plan], args=args)
        entries = entries_from_lua(result)
        self.planner.record(plan, count, entries)
        return entries

    def wait(self, block_ms: int) -> list[StreamEntry]:
        """Block up to ``block_ms`` for the next entry on any lane (at most one per lane)."""
        result: Any = self.client.xreadgroup(
            WORKER_GROUP, self.consumer, dict.fromkeys(self.streams, ">"), count=1,
            block=max(1, block_ms),
        )
        return entries_from_xread(result)
