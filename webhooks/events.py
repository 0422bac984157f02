"""A webhook event as the dispatcher reads it from the stream, and the body it sends.

The entry is written by the job's start or terminal script (``shared.job_record``): the
event name, the job hash's key, the job's text and a snapshot of the job hash (fields
``f:<name>``). The body is the job as ``GET /v1/jobs/{id}`` showed it at that moment
(``shared.job_view``), so a delivery retried an hour later still says what happened then,
and a job purged meanwhile is still reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from shared.job_record import WEBHOOK_EVENT_FIELD_PREFIX, JobField, str_field
from shared.job_view import job_view
from shared.keys import Keys


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    entry_id: str
    event: str  # "start" | "completed"
    job_id: str
    url: str
    body: bytes  # JSON: the job record

    @property
    def message_id(self) -> str:
        """The Standard Webhooks ``webhook-id``: the same for every attempt of one event,
        so a receiver deduplicates by it."""
        return f"msg_{self.job_id}_{self.event}"


def decode_event(keys: Keys, entry_id: str, fields: dict[bytes, bytes]) -> WebhookEvent | None:
    """The event of one stream entry; None when the entry is not one (no URL or job)."""
    prefix = WEBHOOK_EVENT_FIELD_PREFIX.encode()
    record = {name[len(prefix):]: value for name, value in fields.items()
              if name.startswith(prefix)}
    job_key = str_field(fields, "job_key") or ""
    job_prefix = keys.job("")
    url = str_field(record, JobField.WEBHOOK)
    if not url or not job_key.startswith(job_prefix):
        return None
    job_id = job_key[len(job_prefix):]
    text = str_field(fields, "text") or ""
    body = json.dumps(job_view(job_id, record, text), separators=(",", ":"),
                      ensure_ascii=False).encode()
    return WebhookEvent(entry_id=entry_id, event=str_field(fields, "event") or "completed",
                        job_id=job_id, url=url, body=body)
