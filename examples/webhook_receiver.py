"""A webhook receiver for tokenfleet jobs: verify, deduplicate, handle.

Every delivery is signed the Standard Webhooks way (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``) with the fleet's ``TOKENFLEET_WEBHOOK_SECRET``; the body is the job as
``GET /v1/jobs/{id}`` returns it. Delivery is at least once, so a receiver answers 2xx
quickly and ignores a ``webhook-id`` it has already handled (a real one keeps them in its
database). Anything but 2xx makes the dispatcher retry with backoff.

    pip install standardwebhooks
    TOKENFLEET_WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 9000
    tokenfleet jobs submit --message "Hi" --webhook http://127.0.0.1:9000/hooks

(A receiver on 127.0.0.1 needs ``TOKENFLEET_WEBHOOK_ALLOW_PRIVATE=true`` on the fleet:
webhooks go only to public hosts otherwise.)
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_BODY_BYTES = 10 * 1024 * 1024


class Receiver:
    """Checks signatures and drops repeats; ``on_job(event, job)`` sees each event once."""

    def __init__(self, secret: str, on_job: Callable[[str, dict[str, Any]], None]) -> None:
        self._webhook = Webhook(secret)
        self._on_job = on_job
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def handle(self, body: bytes, headers: Mapping[str, str]) -> int:
        """The HTTP status to answer: 401 for a bad signature, else 204."""
        try:
            job = self._webhook.verify(body, dict(headers))
        except WebhookVerificationError:
            return 401
        message_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        with self._lock:
            if message_id in self._seen:
                return 204  # a redelivery of an event already handled
            self._seen.add(message_id)
        event = {k.lower(): v for k, v in headers.items()}.get("tokenfleet-event", "completed")
        self._on_job(event, job)
        return 204


def handler_class(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("content-length") or 0)
            if size > MAX_BODY_BYTES:
                self.send_response(413)
                self.end_headers()
                return
            status = receiver.handle(self.rfile.read(size), dict(self.headers.items()))
            self.send_response(status)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def print_job(event: str, job: dict[str, Any]) -> None:
    print(json.dumps({"event": event, "id": job["id"], "status": job["status"],
                      "text": job["text"]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    receiver = Receiver(os.environ["TOKENFLEET_WEBHOOK_SECRET"], print_job)
    server = ThreadingHTTPServer((args.host, args.port), handler_class(receiver))
    print(f"listening on http://{args.host}:{args.port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
