"""``/healthz`` (the process is up) and ``/readyz`` (it can serve: Redis and a warm worker;
with ``TOKENFLEET_SCALE_TO_ZERO`` Redis alone, as work queues until a worker starts)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from gateway.deps import GatewayDep

router = APIRouter(tags=["health"])


def _unavailable(reason: str) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)


@router.get("/healthz", summary="Liveness: no Redis call")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis answers and a warm worker is live",
            response_model=None)
async def readyz(gw: GatewayDep) -> dict[str, Any] | JSONResponse:
    if gw.is_shutting_down:
        return _unavailable("the gateway is shutting down")
    try:
        await gw.redis.ping()
        workers = await gw.catalog.live_workers()
    except RedisError as exc:
        return _unavailable(f"Redis unavailable: {exc}")
    if not gw.dispatcher.is_subscribed:
        return _unavailable("the token event subscription is down")
    warm = [w for w in workers if w.is_warm]
    body = {"status": "ok", "workers": len(warm), "models": sorted({w.model for w in warm})}
    if gw.settings.scale_to_zero:
        return {**body, "scale_to_zero": True}  # requests queue until a worker starts
    if not warm:
        reason = "no live worker" if not workers else "no worker has finished warming up"
        return _unavailable(reason)
    return body
