"""The webhook dispatcher: delivers the webhook events jobs write (``Keys.webhook_events``)
to their URLs, signed the Standard Webhooks way, at least once, with retries and a
dead-letter stream. Runs as its own process (``tokenfleet webhooks``), never on a gateway's
request path. Imports ``shared`` only.
"""
