"""Standard Webhooks signatures (https://www.standardwebhooks.com): the headers of one
delivery attempt, made with the ``standardwebhooks`` library that receivers verify with."""

from __future__ import annotations

from datetime import datetime, timezone

from standardwebhooks.webhooks import Webhook

USER_AGENT = "tokenfleet-webhooks/1"
EVENT_HEADER = "tokenfleet-event"


class Signer:
    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(secret)

    def headers(self, message_id: str, body: bytes, event: str,
                now: datetime | None = None) -> dict[str, str]:
        """``webhook-id``, ``webhook-timestamp`` (this attempt's) and ``webhook-signature``
        (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), plus content type and event."""
        sent_at = now or datetime.now(tz=timezone.utc)
        signature = self._webhook.sign(message_id, sent_at, body.decode())
        return {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": signature,
            EVENT_HEADER: event,
        }
