"""``GET /v1/fleet``: the fleet now and its last minutes, as JSON (what the dashboard draws).

Behind the same auth as the rest of ``/v1``. Fleet-wide: every gateway answers the same.
The body's shape is documented in docs/operations.md.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.deps import GatewayDep, PrincipalDep
from gateway.fleetview import read_fleet

router = APIRouter(tags=["fleet"])


@router.get("/v1/fleet", summary="Workers, queues, throughput, TTFT and recent requests")
async def get_fleet(gw: GatewayDep, _principal: PrincipalDep) -> dict[str, Any]:
    view = await read_fleet(gw.redis, gw.keys, gw.settings.heartbeat_ttl_s, with_history=True)
    body = view.to_json()
    body["gateway"] = {"id": gw.gateway_id, "open_requests": gw.dispatcher.num_mailboxes}
    return body
