"""Every Redis key, stream, consumer group and channel name tokenfleet uses, in one place."""

from __future__ import annotations

from dataclasses import dataclass

LANES: tuple[str, ...] = ("interactive", "batch")  # read in this order: interactive first
WORKER_GROUP = "workers"


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
