"""What the gateway's files and batches routers share: stores, the arq handle, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from arq.connections import ArqRedis
from fastapi import Depends, HTTPException, Request

from batches.files import FileStore
from batches.queue import arq_redis
from batches.store import BatchStore
from gateway.state import GatewayState


@dataclass(slots=True)
class BatchAPI:
    gw: GatewayState
    files: FileStore
    batches: BatchStore
    arq: ArqRedis


async def get_batch_api(request: Request) -> BatchAPI:
    """Built on first use per gateway lifespan (``app.state.gateway``), then reused."""
    gw: GatewayState = request.app.state.gateway
    api: BatchAPI | None = getattr(request.app.state, "batch_api", None)
    if api is None or api.gw is not gw:
        api = BatchAPI(gw=gw, files=FileStore(gw.redis, gw.keys, gw.settings.file_ttl_s),
                       batches=BatchStore(gw.redis, gw.keys), arq=arq_redis(gw.redis, gw.keys))
        request.app.state.batch_api = api
    return api


BatchAPIDep = Annotated[BatchAPI, Depends(get_batch_api)]


def not_found(what: str, ident: str) -> HTTPException:
    return HTTPException(404, f"no {what} with id {ident!r}")


def bad_request(message: str) -> HTTPException:
    return HTTPException(400, message)


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: ``after=<last_id>`` fetches the next one."""
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
