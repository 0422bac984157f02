"""Deciding what to do with each delivered entry: serve, skip, or dead-letter.

One round trip per batch of entries: each decoded request begins a new attempt
(``BEGIN_ATTEMPT_LUA``: the job's attempt number, which fences off any earlier worker, its
cancel flag, and its stored event count so a retry's events continue the sequence);
everything else is queued on the publisher's outbox. Nothing here raises on a bad entry:
malformed ones go to the dead-letter stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import redis

from shared.errors import ProtocolError
from shared.job_record import BEGIN_ATTEMPT_LUA
from shared.keys import Keys, lane_priority
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
class Attempt:
    """What ``BEGIN_ATTEMPT_LUA`` answered for one delivery."""

    number: int  # this delivery's attempt: every write for it is fenced by this number
    num_events: int  # events already stored (a retried job continues from here)
    is_cancelled: bool
    is_finished: bool = False  # the job already has its result: nothing to run


@dataclass(frozen=True, slots=True)
class IntakePolicy:
    max_deliveries: int
    request_timeout_s: float | None  # default deadline after created_at
    job_ttl_s: int  # for a job hash that has none (a request queued without one)


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

        The only Redis call is the attempts' transaction, made before any state changes here,
        so an error (connection, OOM...) leaves nothing half-done and the caller retries with
        the same entries (a retry begins a higher attempt, which is harmless).
        """
        decoded = [decode_entry(entry) for entry in entries]
        fresh: dict[str, Decoded] = {}  # by request id: one attempt per request
        for item in decoded:
            request = item.request
            if request is None or self._is_copy(item.entry, request, fresh):
                continue
            fresh[request.id] = item
        attempts = self._begin(list(fresh.values()))
        now_s = time.time()
        admitted = 0
        for item in fresh.values():
            assert item.request is not None
            admitted += self._admit_one(item.entry, item.request,
                                        attempts[item.entry.entry_id], now_s)
        for item in decoded:
            if item.request is None:
                self._reject(item.entry, item.problem or "undecodable")
        return admitted

    def _is_copy(self, entry: StreamEntry, request: GenerateRequest,
                 batch: dict[str, Decoded]) -> bool:
        """A request already in flight here or earlier in this batch: our own entry again
        (keep serving it), or a second entry with the same id (acknowledged and dropped)."""
        job = self.jobs.get(request.id)
        earlier = batch.get(request.id)
        if job is not None:
            held = (job.stream, job.entry_id)
        elif earlier is not None:
            held = (earlier.entry.stream, earlier.entry.entry_id)
        else:
            return False
        if held != (entry.stream, entry.entry_id):
            logger.warning("request %s delivered again while in flight; dropping the copy",
                           request.id)
            self.publisher.ack(entry.stream, entry.entry_id)
        return True

    def _begin(self, decoded: list[Decoded]) -> dict[bytes, Attempt]:
        if not decoded:
            return {}
        # EVAL with the source, not a registered script: see Publisher.flush for why
        pipe = self.client.pipeline(transaction=True)
        for item in decoded:
            assert item.request is not None
            job_id = item.request.id
            pipe.eval(BEGIN_ATTEMPT_LUA, 3, self.keys.job(job_id), self.keys.job_events(job_id),
                      self.keys.cancel(job_id), self.policy.job_ttl_s)
        replies = pipe.execute()
        return {item.entry.entry_id: Attempt(int(number), int(num_events), bool(flag),
                                             bool(finished))
                for item, (number, num_events, flag, finished)
                in zip(decoded, replies, strict=True)}

    def _admit_one(self, entry: StreamEntry, request: GenerateRequest, attempt: Attempt,
                   now_s: float) -> int:
        if attempt.is_finished:
            logger.info("request %s already has its result; acknowledging a leftover "
                        "delivery", request.id)
            self.publisher.ack(entry.stream, entry.entry_id)
            return 0
        job = InFlight(id=request.id, stream=entry.stream, entry_id=entry.entry_id,
                       reply_channel=request.reply_channel,
                       num_prompt_tokens=len(request.prompt_token_ids),
                       attempt=attempt.number, next_seq=attempt.num_events)
        if entry.deliveries > self.policy.max_deliveries:
            self._give_up(entry, job)
            return 0
        if attempt.is_cancelled:
            self.publisher.finish(job, "cancelled")
            return 0
        deadline = effective_deadline(request, self.policy.request_timeout_s)
        if deadline is not None and deadline < now_s:
            self.publisher.finish(job, "timeout", error=TIMED_OUT_IN_QUEUE)
            return 0
        engine_request = EngineRequest(request.id, request.prompt_token_ids, request.params,
                                       arrival_time=time.monotonic(),
                                       priority=lane_priority(request.lane))
        try:
            self.engine.add_request(engine_request)
        except ValueError as exc:
            self.publisher.finish(job, "error", error=str(exc))
            return 0
        self.jobs[request.id] = job
        self.publisher.start(job, is_restart=attempt.num_events > 0)
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
