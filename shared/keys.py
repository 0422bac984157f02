"""Every Redis key, stream, consumer group and channel name tokenfleet uses, in one place."""

from __future__ import annotations

from dataclasses import dataclass

LANES: tuple[str, ...] = ("interactive", "batch")  # read in this order: interactive first


def lane_priority(lane: str) -> int:
    """The engine's priority of a lane's requests: 0 (interactive) first; unknown last."""
    return LANES.index(lane) if lane in LANES else len(LANES)
WORKER_GROUP = "workers"
WEBHOOK_GROUP = "dispatchers"  # consumer group of the webhook dispatchers


@dataclass(frozen=True, slots=True)
class Keys:
    """Names under one prefix (``TOKENFLEET_KEY_PREFIX``, default ``tf``)."""

    prefix: str = "tf"

    # --- request queue ------------------------------------------------------------------
    def requests_stream(self, model: str, lane: str = "interactive") -> str:
        """Redis Stream of packed ``GenerateRequest`` for one model and priority lane."""
        return f"{self.prefix}:requests:{model}:{lane}"

    def dead_letter_stream(self, model: str) -> str:
        """Requests that could not be served (poison, malformed, too many deliveries)."""
        return f"{self.prefix}:dead:{model}"

    # --- jobs ---------------------------------------------------------------------------
    def job(self, job_id: str) -> str:
        """Hash: status, owner, model, timings, token counts, finish_reason, error."""
        return f"{self.prefix}:job:{job_id}"

    def job_text(self, job_id: str) -> str:
        """String: the generated text so far (APPENDed by the worker)."""
        return f"{self.prefix}:job:{job_id}:text"

    def job_events(self, job_id: str) -> str:
        """List: every packed ``TokenEvent`` of the job, so late readers can replay."""
        return f"{self.prefix}:job:{job_id}:events"

    def cancel(self, job_id: str) -> str:
        """String set when a client cancels; workers check it between steps."""
        return f"{self.prefix}:cancel:{job_id}"

    def owner_jobs(self, owner: str) -> str:
        """Sorted set: job id -> created_at of the jobs a key created with ``POST /v1/jobs``
        (``owner`` "" when auth is off); trimmed to ``TOKENFLEET_JOB_TTL_S`` at each insert."""
        return f"{self.prefix}:jobs:by-owner:{owner}"

    def idempotency(self, owner: str, digest: str) -> str:
        """Hash: the request fingerprint and job id an ``Idempotency-Key`` (its SHA-256
        ``digest``) of one API key is bound to, for ``TOKENFLEET_IDEMPOTENCY_TTL_S``."""
        return f"{self.prefix}:idem:{owner}:{digest}"

    # --- queue position -----------------------------------------------------------------
    def queue_added(self, model: str, lane: str) -> str:
        """Counter: entries ever added to a lane's request stream (its ``entries-added``);
        each job stores its own number (``queue_seq``) to compute its queue position."""
        return f"{self.prefix}:queue:added:{model}:{lane}"

    def queue_rate(self, model: str) -> str:
        """Hash: the model's measured dequeue rate (requests/s), for ``estimated_start_s``."""
        return f"{self.prefix}:queue:rate:{model}"

    # --- webhooks -----------------------------------------------------------------------
    @property
    def webhook_events(self) -> str:
        """Stream (group ``WEBHOOK_GROUP``) of webhook events, written with the job's
        start or terminal write; each holds a snapshot of the job record and text."""
        return f"{self.prefix}:webhooks:events"

    @property
    def webhook_due(self) -> str:
        """Sorted set: webhook event entry id -> unix time its next delivery attempt is due."""
        return f"{self.prefix}:webhooks:due"

    @property
    def webhook_attempts(self) -> str:
        """Hash: webhook event entry id -> delivery attempts made so far."""
        return f"{self.prefix}:webhooks:attempts"

    @property
    def webhook_dead(self) -> str:
        """Stream: webhook events given up after ``TOKENFLEET_WEBHOOK_MAX_ATTEMPTS`` (for
        operators: the event, the URL, the last error)."""
        return f"{self.prefix}:webhooks:dead"

    # --- live token delivery ------------------------------------------------------------
    def gateway_channel(self, gateway_id: str) -> str:
        """Pub/sub channel a gateway listens on; workers publish batches of events to it."""
        return f"{self.prefix}:events:{gateway_id}"

    # --- fleet --------------------------------------------------------------------------
    def worker(self, worker_id: str) -> str:
        """Heartbeat hash of one worker, with a TTL."""
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        """Sorted set: worker id -> unix time of its last heartbeat."""
        return f"{self.prefix}:workers"

    def model_info(self, model: str) -> str:
        """Hash a worker writes for its model: tokenizer, chat template, context length."""
        return f"{self.prefix}:model:{model}"

    @property
    def models(self) -> str:
        """Set of every model a worker has ever published info for (kept with zero workers,
        so a scaled-to-zero fleet still knows what it serves and what queues to watch)."""
        return f"{self.prefix}:models"

    # --- telemetry (metrics, dashboard, autoscaler) --------------------------------------
    def fleet_series(self, bucket: int) -> str:
        """Hash of fleet-wide counts in one time bucket (``shared.telemetry``), with a TTL."""
        return f"{self.prefix}:fleet:series:{bucket}"

    @property
    def fleet_recent_jobs(self) -> str:
        """List: summaries of the latest finished requests, newest first, capped."""
        return f"{self.prefix}:fleet:recent"

    @property
    def fleet_scaler(self) -> str:
        """Hash the autoscaler writes each tick: per model its signal, target and workers."""
        return f"{self.prefix}:fleet:scaler"

    # --- auth ---------------------------------------------------------------------------
    @property
    def api_keys(self) -> str:
        """Hash: sha256(key) -> packed key record."""
        return f"{self.prefix}:apikeys"

    def rate_limit(self, key_id: str, kind: str, window: int) -> str:
        """Counter for one key, one kind (requests/tokens), one minute window."""
        return f"{self.prefix}:rl:{key_id}:{kind}:{window}"

    # --- batches (files, batches, the arq orchestrator) ----------------------------------
    def file(self, file_id: str) -> str:
        """Hash: an uploaded or generated file's metadata (owner, filename, bytes, purpose)."""
        return f"{self.prefix}:file:{file_id}"

    def file_content(self, file_id: str) -> str:
        """String: a file's bytes (read in slices with GETRANGE, never whole)."""
        return f"{self.prefix}:file:{file_id}:content"

    def file_upload(self, file_id: str) -> str:
        """String: a file's bytes while they arrive; renamed to ``file_content`` when whole."""
        return f"{self.prefix}:file:{file_id}:upload"

    def owner_files(self, owner: str) -> str:
        """Sorted set: file id -> created_at, one per API key (``owner`` "" when auth is off)."""
        return f"{self.prefix}:files:by-owner:{owner}"

    def batch(self, batch_id: str) -> str:
        """Hash: a batch's status, counts, timestamps, file ids and feeding cursor."""
        return f"{self.prefix}:batch:{batch_id}"

    def owner_batches(self, owner: str) -> str:
        """Sorted set: batch id -> created_at, one per API key."""
        return f"{self.prefix}:batches:by-owner:{owner}"

    @property
    def active_batches(self) -> str:
        """Sorted set: batch id -> expires_at, for batches not yet in a final status."""
        return f"{self.prefix}:batches:active"

    def batch_inflight(self, batch_id: str) -> str:
        """Hash: custom_id -> "job_id offset" of each line submitted and not yet recorded."""
        return f"{self.prefix}:batch:{batch_id}:inflight"

    def batch_results(self, batch_id: str) -> str:
        """Hash: custom_id -> the line's output (JSON), written once when the line finishes."""
        return f"{self.prefix}:batch:{batch_id}:results"

    def batch_seen(self, batch_id: str) -> str:
        """Set: custom_ids read while validating (duplicate detection off the heap)."""
        return f"{self.prefix}:batch:{batch_id}:seen"

    def batch_lease(self, batch_id: str) -> str:
        """String: the token of the orchestrator slice that owns the batch, with a short TTL."""
        return f"{self.prefix}:batch:{batch_id}:lease"

    @property
    def arq_queue(self) -> str:
        """arq's queue (sorted set) of orchestration jobs; arq names its own keys under it."""
        return f"{self.prefix}:arq:queue"
