"""``tokenfleet webhooks``: run one webhook dispatcher until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal

from shared.redis_conn import async_client
from shared.settings import Settings
from webhooks.dispatcher import WebhookDispatcher

logger = logging.getLogger("tokenfleet.webhooks")


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT. Without ``TOKENFLEET_WEBHOOK_SECRET`` there is nothing to
    deliver (gateways refuse webhooks): say so and idle, so a compose service stays up."""
    asyncio.run(_serve(settings))
    return 0


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if settings.webhook_secret is None:
        logger.warning("TOKENFLEET_WEBHOOK_SECRET is not set: webhooks are off (gateways "
                       "refuse jobs that name one); idle until stopped. Make a secret with "
                       "`tokenfleet webhooks secret`.")
        await stop.wait()
        return
    redis = async_client(settings)
    dispatcher = WebhookDispatcher(settings, redis)
    try:
        await dispatcher.run(stop)
    finally:
        await dispatcher.client.aclose()
        await redis.aclose()


def new_secret() -> str:
    """A fresh Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    import base64
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
