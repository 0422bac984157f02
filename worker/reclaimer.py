"""Taking over requests a dead worker left pending, and keeping our own from being taken.

A request entry stays in the group's pending list from delivery until the worker stores its
result and XACKs it. A live worker refreshes the idle time of its in-flight entries
(``touch``: ``XCLAIM ... JUSTID`` to itself, which does not count as a delivery), so an
entry idle longer than ``claim_idle_ms`` belongs to a worker that stopped making progress.
``claim`` lists such entries (``XPENDING ... IDLE``) and claims them (``XCLAIM``, which
re-checks the idle time, so two workers never both win). What to do with a claimed entry
(re-run it, or dead-letter it after too many deliveries) is the intake's decision.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import redis

from shared.keys import WORKER_GROUP
from worker.reader import StreamEntry

logger = logging.getLogger(__name__)


class Reclaimer:
    def __init__(self, client: redis.Redis, streams: list[str], consumer: str,
                 claim_idle_ms: int) -> None:
        self.client = client
        self.streams = streams
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms

    def touch(self, in_flight: Iterable[tuple[str, bytes]]) -> None:
        """Reset the idle time of our in-flight entries, one round trip."""
        by_stream = _group(in_flight)
        if not by_stream:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xclaim(stream, WORKER_GROUP, self.consumer, 0, ids, justid=True)
        pipe.execute()

    def release(self, in_flight: Iterable[tuple[str, bytes]]) -> None:
        """Hand unfinished entries back on exit: mark them idle for ``claim_idle_ms`` so the
        next reclaim pass of any worker takes them instead of waiting that long."""
        by_stream = _group(in_flight)
        if not by_stream:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xclaim(stream, WORKER_GROUP, self.consumer, 0, ids, idle=self.claim_idle_ms,
                        justid=True)
        pipe.execute()

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
                        deliveries=deliveries.get(entry_id, 0) + 1, is_reclaimed=True)
            for entry_id, fields in claimed
            if fields is not None  # deleted from the stream meanwhile
        ]


def _group(in_flight: Iterable[tuple[str, bytes]]) -> dict[str, list[Any]]:
    by_stream: dict[str, list[Any]] = {}  # list[Any]: redis-py's xclaim stub is invariant
    for stream, entry_id in in_flight:
        by_stream.setdefault(stream, []).append(entry_id)
    return by_stream
