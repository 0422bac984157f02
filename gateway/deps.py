"""FastAPI dependencies as ``Annotated`` aliases, so route signatures read as types.

All are ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, which costs
more than the whole rest of a request.
"""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from gateway.auth import Principal, get_principal
from gateway.state import GatewayState
from shared.settings import Settings


async def get_gateway(request: Request) -> GatewayState:
    gateway: GatewayState = request.app.state.gateway
    return gateway


async def get_settings(request: Request) -> Settings:
    return (await get_gateway(request)).settings


async def get_redis(request: Request) -> aioredis.Redis:
    return (await get_gateway(request)).redis


GatewayDep = Annotated[GatewayState, Depends(get_gateway)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[aioredis.Redis, Depends(get_redis)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
