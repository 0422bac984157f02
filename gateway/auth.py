"""Who is calling: anonymous when ``TOKENFLEET_AUTH`` is off, else a valid API key.

Keys come from ``TOKENFLEET_API_KEYS`` (static) or from Redis (``tokenfleet keys create``;
only digests are stored). Lookups are cached for ``CACHE_S`` per key, so a revoked key stops
working within that time. Job records store ``Principal.owner``: reading or cancelling
another key's job is a 404.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request

from shared.apikeys import KeyRecord, digest, lookup, static_record
from shared.errors import AuthError
from shared.keys import Keys
from shared.settings import Settings

CACHE_S = 5.0


@dataclass(frozen=True, slots=True)
class Principal:
    owner: str  # "" when auth is off; else the key's id
    rpm: int = 0  # 0: unlimited
    tpm: int = 0

    @property
    def is_anonymous(self) -> bool:
        return not self.owner


ANONYMOUS = Principal(owner="")


class Authenticator:
    def __init__(self, settings: Settings, redis: aioredis.Redis, keys: Keys) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}

    async def principal(self, authorization: str) -> Principal:
        if not self.settings.auth:
            return ANONYMOUS
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        record = await self._record(token)
        if record is None:
            raise AuthError("invalid or revoked API key")
        return Principal(owner=record.id,
                         rpm=record.rpm if record.rpm is not None else self.settings.rate_limit_rpm,
                         tpm=record.tpm if record.tpm is not None else self.settings.rate_limit_tpm)

    async def _record(self, token: str) -> KeyRecord | None:
        if any(hmac.compare_digest(token, key) for key in self.settings.api_keys):
            return static_record(token)
        key = digest(token)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < CACHE_S:
            return cached[1]
        record = await lookup(self.redis, self.keys, token)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (time.monotonic(), record)
        return record


async def get_principal(request: Request) -> Principal:
    auth: Authenticator = request.app.state.gateway.auth
    return await auth.principal(request.headers.get("authorization", ""))
