"""Who is calling: anonymous when ``TOKENFLEET_AUTH`` is off, else a valid API key.

Keys come from ``TOKENFLEET_API_KEYS`` (static; digests computed once at start and compared
with ``hmac.compare_digest``) or from Redis (``tokenfleet keys create``; only digests are
stored). A Redis lookup, found or not, is cached in-process for ``TOKENFLEET_AUTH_CACHE_S``
(5 s), so a request with a known key costs no Redis round trip, and a revoked key stops
working within that time. Job records store ``Principal.owner``: reading or cancelling
another key's job is a 404.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request

from shared.apikeys import MAX_KEY_LENGTH, KeyRecord, digest, lookup, match_static, static_records
from shared.errors import AuthError
from shared.keys import Keys
from shared.settings import Settings

CACHE_MAX_ENTRIES = 10_000  # least recently used lookups are dropped past this


@dataclass(frozen=True, slots=True)
class Principal:
    owner: str  # "" when auth is off; else the key's id
    rpm: int = 0  # 0: unlimited
    tpm: int = 0

    @property
    def is_anonymous(self) -> bool:
        return not self.owner


ANONYMOUS = Principal(owner="")


def bearer_token(authorization: str) -> str:
    """The key in ``Authorization: Bearer <key>``; ``AuthError`` if there is none."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing API key: send the header 'Authorization: Bearer <key>'")
    return token


class Authenticator:
    def __init__(self, settings: Settings, redis: aioredis.Redis, keys: Keys) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.cache_s = settings.auth_cache_s
        self._static = static_records(settings.api_keys)
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()

    @property
    def num_static_keys(self) -> int:
        return len(self._static)

    async def principal(self, authorization: str) -> Principal:
        if not self.settings.auth:
            return ANONYMOUS
        token = bearer_token(authorization)
        record = None if len(token) > MAX_KEY_LENGTH else await self._record(digest(token))
        if record is None:
            raise AuthError("invalid or revoked API key")
        settings = self.settings
        return Principal(owner=record.id,
                         rpm=settings.rate_limit_rpm if record.rpm is None else record.rpm,
                         tpm=settings.rate_limit_tpm if record.tpm is None else record.tpm)

    def forget(self) -> None:
        """Drop every cached lookup (tests; an operator's revoke takes effect at once)."""
        self._cache.clear()

    async def _record(self, key_digest: str) -> KeyRecord | None:
        static = match_static(key_digest, self._static)
        if static is not None:
            return static
        cached = self._cache.get(key_digest)
        if cached is not None and time.monotonic() - cached[0] < self.cache_s:
            self._cache.move_to_end(key_digest)
            return cached[1]
        record = await lookup(self.redis, self.keys, key_digest)  # RedisError -> 503
        self._cache[key_digest] = (time.monotonic(), record)
        self._cache.move_to_end(key_digest)
        while len(self._cache) > CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)
        return record


async def get_principal(request: Request) -> Principal:
    auth: Authenticator = request.app.state.gateway.auth
    return await auth.principal(request.headers.get("authorization", ""))
