"""Taking over requests a dead worker left pending, keeping our own, and tidying the group.

A request entry stays in the group's pending list from delivery until the worker stores its
result and XACKs it. A live worker refreshes the idle time of its in-flight entries
(``touch``), so an entry idle longer than ``claim_idle_ms`` belongs to a worker that stopped
making progress. ``claim`` lists such entries (``XPENDING ... IDLE``) and claims them
(``XCLAIM`` with that min-idle time, which re-checks it, so two workers never both win).

``touch`` refreshes only entries the group still lists under this consumer (checked in the
same script as the ``XCLAIM``), so a worker that stalled past the claim idle time never takes
its entry back from the worker that claimed it; it learns that it lost those entries. The
``Toucher`` thread touches while the loop is inside a long engine step.

``tidy`` (maintenance) deletes the entries every consumer is done with (``XTRIM MINID``:
everything before the oldest pending entry, or up to the last delivered one when nothing is
pending). Trimming the head, unlike ``XDEL``, leaves no tombstones, so ``XINFO GROUPS``
keeps an exact ``lag`` for the gateway's backlog. It also deletes consumers whose worker has
no heartbeat and that hold no pending entries (checked atomically).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

from shared.keys import WORKER_GROUP, Keys
from worker.reader import StreamEntry

logger = logging.getLogger(__name__)

# KEYS: stream. ARGV: group, consumer, idle ms to set (0: fresh), entry ids.
# Resets the idle time of the given entries that the group lists under this consumer;
# returns the ids it does not (claimed by another worker, or acknowledged).
_TOUCH_LUA = """
local lost = {}
for i = 4, #ARGV do
  local mine = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #mine == 1 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# KEYS: stream. ARGV: group. Deletes the entries before the oldest pending one, or, with
# none pending, every entry delivered to the group. Returns how many went.
_TRIM_LUA = """
local minid = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
if not minid then
  local last = nil
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
  end
  if not last then return 0 end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  minid = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end
return redis.call('XTRIM', KEYS[1], 'MINID', minid)
"""

# KEYS: stream, then each candidate's heartbeat key. ARGV: group, then candidate names.
# Deletes the candidates without a heartbeat that hold no pending entry; returns how many.
_DELETE_DEAD_CONSUMERS_LUA = """
local deleted = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 and
     #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[i]) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[i])
    deleted = deleted + 1
  end
end
return deleted
"""


class Reclaimer:
    def __init__(self, client: redis.Redis, keys: Keys, streams: list[str], consumer: str,
                 claim_idle_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.streams = streams
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self._touch = client.register_script(_TOUCH_LUA)
        self._trim = client.register_script(_TRIM_LUA)
        self._delete_dead = client.register_script(_DELETE_DEAD_CONSUMERS_LUA)

    def touch(self, in_flight: Iterable[tuple[str, bytes]]) -> set[tuple[str, bytes]]:
        """Reset the idle time of our in-flight entries, one round trip; returns the
        (stream, entry id) pairs that are no longer ours."""
        return self._refresh(in_flight, idle_ms=0)

    def release(self, in_flight: Iterable[tuple[str, bytes]]) -> None:
        """Hand unfinished entries back on exit: mark them idle for ``claim_idle_ms`` so the
        next reclaim pass of any worker takes them instead of waiting that long."""
        self._refresh(in_flight, idle_ms=self.claim_idle_ms)

    def _refresh(self, in_flight: Iterable[tuple[str, bytes]],
                 idle_ms: int) -> set[tuple[str, bytes]]:
        by_stream = _group(in_flight)
        if not by_stream:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            self._touch(keys=[stream], args=[WORKER_GROUP, self.consumer, idle_ms, *ids],
                        client=pipe)
        lost: set[tuple[str, bytes]] = set()
        for stream, lost_ids in zip(by_stream, pipe.execute(), strict=True):
            lost.update((stream, entry_id) for entry_id in lost_ids)
        return lost

    def claim(self, count: int) -> list[StreamEntry]:
        """Claim up to ``count`` entries idle longer than ``claim_idle_ms``; two round trips."""
        if count <= 0:
            return []
        idle = self._list_idle(count)
        if not idle:
            return []
        pipe = self.client.pipeline(transaction=False)
        for stream, pending in idle.items():
            ids: list[Any] = [p["message_id"] for p in pending]
            pipe.xclaim(stream, WORKER_GROUP, self.consumer, self.claim_idle_ms, ids)
        entries: list[StreamEntry] = []
        for (stream, pending), claimed in zip(idle.items(), pipe.execute(), strict=True):
            entries.extend(self._entries(stream, pending, claimed))
        if entries:
            logger.info("claimed %d stalled request(s) from other workers", len(entries))
        return entries

    def tidy(self) -> None:
        """Trim acknowledged entries and delete dead consumers; two round trips."""
        pipe = self.client.pipeline(transaction=False)
        for stream in self.streams:
            self._trim(keys=[stream], args=[WORKER_GROUP], client=pipe)
            pipe.xinfo_consumers(stream, WORKER_GROUP)
        replies = pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        num_calls = 0
        for stream, consumers in zip(self.streams, replies[1::2], strict=True):
            names = [_text(c["name"]) for c in consumers
                     if int(c["pending"]) == 0 and _text(c["name"]) != self.consumer]
            if names:
                keys = [stream, *(self.keys.worker(name) for name in names)]
                self._delete_dead(keys=keys, args=[WORKER_GROUP, *names], client=pipe)
                num_calls += 1
        if num_calls:
            num_deleted = sum(pipe.execute())
            if num_deleted:
                logger.info("deleted %d dead consumer(s) from the group", num_deleted)

    def _list_idle(self, count: int) -> dict[str, list[dict[str, Any]]]:
        pipe = self.client.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xpending_range(stream, WORKER_GROUP, "-", "+", count, idle=self.claim_idle_ms)
        idle: dict[str, list[dict[str, Any]]] = {}
        for stream, pending in zip(self.streams, pipe.execute(), strict=True):
            if pending and count > 0:
                idle[stream] = pending[:count]  # lanes in priority order share ``count``
                count -= len(idle[stream])
        return idle

    def _entries(self, stream: str, pending: list[dict[str, Any]],
                 claimed: list[Any]) -> list[StreamEntry]:
        deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        return [
            StreamEntry(stream=stream, entry_id=entry_id, fields=dict(fields or {}),
                        deliveries=deliveries.get(entry_id, 0) + 1)
            for entry_id, fields in claimed
            if fields is not None  # deleted from the stream meanwhile
        ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _group(in_flight: Iterable[tuple[str, bytes]]) -> dict[str, list[Any]]:
    by_stream: dict[str, list[Any]] = {}  # list[Any]: redis-py's xclaim stub is invariant
    for stream, entry_id in in_flight:
        by_stream.setdefault(stream, []).append(entry_id)
    return by_stream


class Toucher:
    """Touches our in-flight entries from a daemon thread, every ``interval_s``, so a long
    engine step never makes a live worker's entries look stalled (a stopped process, or a
    Redis it cannot reach, still does). The loop publishes what is in flight with
    ``set_in_flight`` and collects what turned out lost with ``take_lost``.

    A loop that has not called ``mark_progress`` for ``stall_timeout_s`` (a step wedged in
    the model, a hung device) is not alive in any useful sense: the toucher stops touching,
    so other workers claim its requests after the claim idle time, and it logs why once."""

    def __init__(self, reclaimer: Reclaimer, interval_s: float,
                 stall_timeout_s: float = float("inf")) -> None:
        self.reclaimer = reclaimer
        self.interval_s = interval_s
        self.stall_timeout_s = stall_timeout_s
        self._progress_at = time.monotonic()
        self._is_stalled = False
        self._in_flight: tuple[tuple[str, bytes], ...] = ()
        self._lost: set[tuple[str, bytes]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="toucher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5.0)

    def set_in_flight(self, in_flight: Iterable[tuple[str, bytes]]) -> None:
        self._in_flight = tuple(in_flight)  # one reference swap: no lock needed

    def mark_progress(self) -> None:
        """The loop is turning (called once per loop turn)."""
        self._progress_at = time.monotonic()

    def is_stalled(self) -> bool:
        stalled_s = time.monotonic() - self._progress_at
        is_stalled = stalled_s > self.stall_timeout_s
        if is_stalled != self._is_stalled:
            self._is_stalled = is_stalled
            if is_stalled:
                logger.error("the worker loop has not advanced for %.0f s (a wedged step?): "
                             "no longer refreshing its %d request(s), so other workers "
                             "claim them", stalled_s, len(self._in_flight))
            else:
                logger.warning("the worker loop is advancing again")
        return is_stalled

    def take_lost(self) -> set[tuple[str, bytes]]:
        with self._lock:
            lost, self._lost = self._lost, set()
        return lost

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            in_flight = self._in_flight
            if not in_flight or self.is_stalled():
                continue
            try:
                lost = self.reclaimer.touch(in_flight)
            except redis.RedisError as exc:
                logger.debug("touch failed (the loop reports Redis trouble): %s", exc)
                continue
            if lost:
                with self._lock:
                    self._lost |= lost
