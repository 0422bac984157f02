"""The app factory: ``create_app(settings)``. Clients are created in the lifespan, not here."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.exceptions import RedisError

from gateway.auth import Authenticator
from gateway.backlog import Backlog
from gateway.catalog import Catalog
from gateway.errors import install_exception_handlers
from gateway.events import Dispatcher
from gateway.jobs import JobStore
from gateway.metrics import GatewayMetrics, HttpMetricsMiddleware
from gateway.middleware import BodyLimitMiddleware
from gateway.routers import (
    batches,
    chat,
    completions,
    dashboard,
    files,
    fleet,
    health,
    jobs,
    metrics,
    models,
)
from gateway.state import GatewayState
from shared.apikeys import count_keys
from shared.keys import Keys
from shared.ratelimit import RateLimiter
from shared.redis_conn import async_client
from shared.settings import Settings

logger = logging.getLogger("tokenfleet.gateway")

BACKGROUND_DRAIN_S = 2.0  # how long shutdown waits for cancel flags still being written


def create_app(settings: Settings) -> FastAPI:
    gateway_metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = _build_state(settings, gateway_metrics)
        await gw.dispatcher.start()  # subscribed before the first request is served
        app.state.gateway = gw
        gateway_metrics.describe(gw.gateway_id)
        logger.info("gateway %s ready (events on %s)", gw.gateway_id, gw.reply_channel)
        await _log_auth_mode(gw)
        try:
            yield
        finally:
            gw.is_shutting_down = True
            await gw.wait_background(BACKGROUND_DRAIN_S)
            await gw.dispatcher.close()
            await gw.redis.aclose()

    app = FastAPI(
        title="tokenfleet gateway",
        summary="OpenAI-compatible front door of a Redis-Streams LLM worker fleet",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       streamed_paths=frozenset({files.UPLOAD_PATH}))
    app.add_middleware(HttpMetricsMiddleware, metrics=gateway_metrics)
    app.state.metrics = gateway_metrics
    install_exception_handlers(app)
    for module in (chat, completions, jobs, models, health, files, batches, fleet, metrics,
                   dashboard):
        app.include_router(module.router)
    return app


async def _log_auth_mode(gw: GatewayState) -> None:
    """Say at start which mode the gateway runs in; warn when no key could ever pass."""
    settings = gw.settings
    limits = (f"rate limits per key: {settings.rate_limit_rpm or 'unlimited'} requests/min, "
              f"{settings.rate_limit_tpm or 'unlimited'} tokens/min (keys may override)")
    if not settings.auth:
        logger.info("auth: off (TOKENFLEET_AUTH=false); every caller is anonymous and "
                    "rate limits do not apply")
        return
    try:
        stored: int | str = await count_keys(gw.redis, gw.keys)
    except RedisError:
        stored = "unknown (Redis unreachable)"
    logger.info("auth: on; %d static keys, %s keys in Redis; %s",
                gw.auth.num_static_keys, stored, limits)
    if stored == 0 and gw.auth.num_static_keys == 0:
        logger.warning("auth is on but there is no API key: every request gets 401 until "
                       "`tokenfleet keys create` or TOKENFLEET_API_KEYS adds one")


def _build_state(settings: Settings, metrics: GatewayMetrics | None = None) -> GatewayState:
    redis = async_client(settings)
    keys = Keys(settings.key_prefix)
    gateway_id = secrets.token_hex(8)
    return GatewayState(
        settings=settings,
        keys=keys,
        redis=redis,
        gateway_id=gateway_id,
        dispatcher=Dispatcher(redis, keys.gateway_channel(gateway_id)),
        catalog=Catalog(redis, keys, settings.heartbeat_ttl_s,
                        scale_to_zero=settings.scale_to_zero),
        backlog=Backlog(redis, keys, settings.backlog_limit),
        auth=Authenticator(settings, redis, keys),
        limiter=RateLimiter(redis, keys),
        jobs=JobStore(redis, keys, settings.job_ttl_s),
        metrics=metrics or GatewayMetrics(),
    )
