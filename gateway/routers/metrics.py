"""``GET /metrics``: Prometheus text exposition of this gateway and of the fleet.

Not behind auth (like ``/healthz``): it holds counts, never prompts, keys or job ids; keep
it off the public network (docs/deploy.md).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.deps import GatewayDep
from gateway.fleetview import read_fleet
from gateway.metrics import CONTENT_TYPE, GatewayMetrics

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics (gateway and fleet)",
            response_class=Response)
async def metrics(request: Request, gw: GatewayDep) -> Response:
    registry: GatewayMetrics = request.app.state.metrics
    view = await read_fleet(gw.redis, gw.keys, gw.settings.heartbeat_ttl_s)
    body = registry.render(view, num_open_requests=gw.dispatcher.num_mailboxes)
    return Response(body, media_type=CONTENT_TYPE)
