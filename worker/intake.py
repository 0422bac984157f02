"""Deciding what to do with each delivered entry: serve, skip, or dead-letter.

One round trip per batch of entries (cancel flags, and the event count of reclaimed jobs so
their new events continue the sequence); everything else is queued on the publisher's
outbox. Nothing here raises on a bad entry: malformed ones go to the dead-letter stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import redis

from shared.errors import ProtocolError
from shared.keys import Keys
from shared.protocol import GenerateRequest, unpack_request
from worker.engine.types import Engine, EngineRequest
from worker.publisher import InFlight, Publisher
from worker.reader import StreamEntry

logger = logging.getLogger(__name__)

TIMED_OUT_IN_QUEUE = "timed out in queue"


@dataclass(slots=True)
class Decoded:
    entry: StreamEntry
    request: GenerateRequest | None = None
    problem: str | None = None  # set -> the entry is dead-lettered


@dataclass(slots=True)
class JobLookup:
    """What Redis says about a decoded request before it is admitted."""

    is_cancelled: bool = False
    num_events: int = 0  # events already stored (a reclaimed job continues from here)


@dataclass(frozen=True, slots=True)
class IntakePolicy:
    max_deliveries: int
    request_timeout_s: float | None  # default deadline after created_at


def decode_entry(entry: StreamEntry) -> Decoded:
    raw = entry.fields.get(b"m")
    if raw is None:
        return Decoded(entry, problem="entry has no 'm' field")
    try:
        return Decoded(entry, request=unpack_request(raw))
    except ProtocolError as exc:
        return Decoded(entry, problem=str(exc))


def salvage_job(fields: dict[bytes, bytes]) -> tuple[str, str] | None:
    """(job id, reply channel) from a malformed message, when it still has a string id."""
    try:
        obj = msgpack.unpackb(fields[b"m"], raw=False)
    except Exception:  # anything: the message is already known to be broken
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
        return None
    channel = obj.get("reply_channel")
    return obj["id"], channel if isinstance(channel, str) else ""


def effective_deadline(request: GenerateRequest, default_timeout_s: float | None) -> float | None:
    if request.deadline is not None:
        return request.deadline
    if default_timeout_s and request.created_at > 0:
        return request.created_at + default_timeout_s
    return None


class Intake:
    def __init__(self, client: redis.Redis, keys: Keys, engine: Engine, publisher: Publisher,
                 jobs: dict[str, InFlight], policy: IntakePolicy) -> None:
        self.client = client
        self.keys = keys
        self.engine = engine
        self.publisher = publisher
        self.jobs = jobs  # shared with the loop: the requests in the engine
        self.policy = policy
        self.on_admitted: Callable[[GenerateRequest], None] | None = None  # metrics

    def admit(self, entries: list[StreamEntry]) -> int:
        """Hand the servable entries to the engine; returns how many were admitted.

        The only Redis call is the lookup, made before any state changes, so a connection
        error leaves nothing half-done and the caller can retry with the same entries.
        """
        decoded = [decode_entry(entry) for entry in entries]
        lookups = self._lookup(decoded)
        now_s = time.time()
        admitted = 0
        for item in decoded:
            if item.request is None:
                self._reject(item.entry, item.problem or "undecodable")
            else:
                admitted += self._admit_one(item.entry, item.request,
                                            lookups[item.entry.entry_id], now_s)
        return admitted

    def _lookup(self, decoded: list[Decoded]) -> dict[bytes, JobLookup]:
        items = [(d.entry, d.request) for d in decoded if d.request is not None]
        if not items:
            return {}
        pipe = self.client.pipeline(transaction=False)
        pipe.mget([self.keys.cancel(request.id) for _, request in items])
        reclaimed = [(entry, request) for entry, request in items if entry.is_reclaimed]
        for _, request in reclaimed:
            pipe.llen(self.keys.job_events(request.id))
        flags, *counts = pipe.execute()
        lookups = {entry.entry_id: JobLookup(is_cancelled=flag is not None)
                   for (entry, _), flag in zip(items, flags, strict=True)}
        for (entry, _), count in zip(reclaimed, counts, strict=True):
            lookups[entry.entry_id].num_events = int(count)
        return lookups

    def _admit_one(self, entry: StreamEntry, request: GenerateRequest, lookup: JobLookup,
                   now_s: float) -> int:
        job = InFlight(id=request.id, stream=entry.stream, entry_id=entry.entry_id,
                       reply_channel=request.reply_channel,
                       num_prompt_tokens=len(request.prompt_token_ids),
                       next_seq=lookup.num_events)
        if request.id in self.jobs:
            logger.warning("request %s delivered again while in flight; dropping the copy",
                           request.id)
            self.publisher.ack(entry.stream, entry.entry_id)
            return 0
        if entry.deliveries > self.policy.max_deliveries:
            self._give_up(entry, job)
            return 0
        if lookup.is_cancelled:
            self.publisher.finish(job, "cancelled")
            return 0
        deadline = effective_deadline(request, self.policy.request_timeout_s)
        if deadline is not None and deadline < now_s:
            self.publisher.finish(job, "timeout", error=TIMED_OUT_IN_QUEUE)
            return 0
        engine_request = EngineRequest(request.id, request.prompt_token_ids, request.params,
                                       arrival_time=time.monotonic())
        try:
            self.engine.add_request(engine_request)
        except ValueError as exc:
            self.publisher.finish(job, "error", error=str(exc))
            return 0
        self.jobs[request.id] = job
        self.publisher.start(job, is_restart=entry.is_reclaimed)
        if self.on_admitted is not None:
            self.on_admitted(request)
        return 1

    def _give_up(self, entry: StreamEntry, job: InFlight) -> None:
        reason = (f"delivered {entry.deliveries} times; the workers serving it kept dying "
                  f"(max_deliveries={self.policy.max_deliveries})")
        logger.error("dead-lettering request %s: %s", job.id, reason)
        self.publisher.dead_letter(entry.stream, entry.entry_id, entry.fields, reason)
        self.publisher.finish(job, "error", error=reason, ack=False)

    def _reject(self, entry: StreamEntry, problem: str) -> None:
        logger.warning("dead-lettering entry %s of %s: %s", entry.entry_id.decode(),
                       entry.stream, problem)
        self.publisher.dead_letter(entry.stream, entry.entry_id, entry.fields, problem)
        salvaged = salvage_job(entry.fields)
        if salvaged is not None:
            job_id, channel = salvaged
            job = InFlight(id=job_id, stream=entry.stream, entry_id=entry.entry_id,
                           reply_channel=channel, num_prompt_tokens=0)
            self.publisher.finish(job, "error", error=f"malformed request: {problem}",
                                  ack=False)
