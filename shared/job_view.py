"""A job record as the API shows it: the body of ``GET /v1/jobs/{id}``.

The gateway answers polls with it and the webhook dispatcher sends it (built from the
snapshot the job's start or terminal write stored with the webhook event), so both say the
same thing in the same shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.job_record import STATUS_FAILED, JobRecord

QUEUE_TIMEOUT_REASON = "timeout"  # the finish_reason of a request that timed out in the queue
DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = ("completed",)
WEBHOOK_EVENTS: tuple[str, ...] = ("start", "completed")


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(max(end - start, 0.0), 6)


def error_code(status: str | None, finish_reason: str | None) -> str | None:
    """What a client can act on when a job failed: ``queue_timeout`` (it waited past its
    ``timeout``; retry) or ``generation_failed``; None unless it failed."""
    if status != STATUS_FAILED:
        return None
    return "queue_timeout" if finish_reason == QUEUE_TIMEOUT_REASON else "generation_failed"


def webhook_events_filter(record: JobRecord) -> list[str] | None:
    if record.webhook is None:
        return None
    return (record.webhook_events or ",".join(DEFAULT_WEBHOOK_EVENTS)).split(",")


def job_view(job_id: str, fields: Mapping[bytes, bytes], text: str | None) -> dict[str, Any]:
    """The JSON body of ``GET /v1/jobs/{id}`` (``queue_position`` and ``estimated_start_s``
    are null here; the gateway fills them in for a queued job)."""
    record = JobRecord.from_hash(fields)
    created = record.created_at
    return {
        "id": job_id,
        "object": "job",
        "status": record.status,
        "model": record.model,
        "kind": record.kind,
        "lane": record.lane,
        "text": text,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "max_tokens": record.max_tokens,
        "finish_reason": record.finish_reason,
        "error": record.error,
        "error_code": error_code(record.status, record.finish_reason),
        "worker": record.worker,
        "created_at": created,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "timings": {
            "queue_s": _since(created, record.started_at),
            "ttft_s": _since(created, record.first_token_at),
            "total_s": _since(created, record.finished_at),
        },
        "queue_position": None,
        "estimated_start_s": None,
        "webhook": record.webhook,
        "webhook_events_filter": webhook_events_filter(record),
    }
