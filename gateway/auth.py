"""Who is calling. Today: anonymous unless ``TOKENFLEET_AUTH`` is on, then a static key list.

The job records store ``Principal.owner``; reading or cancelling someone else's job is a 404.
Keys kept in Redis (``Keys.api_keys``), rate limits and quotas plug in here later.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from shared.errors import AuthError


@dataclass(frozen=True, slots=True)
class Principal:
    owner: str  # "" when auth is off; else a stable id derived from the API key

    @property
    def is_anonymous(self) -> bool:
        return not self.owner


ANONYMOUS = Principal(owner="")


def key_id(api_key: str) -> str:
    """A stable, non-secret id for a key (what job records store as ``owner``)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


async def get_principal(request: Request) -> Principal:
    settings = request.app.state.gateway.settings
    if not settings.auth:
        return ANONYMOUS
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token, key) for key in settings.api_keys):
        raise AuthError("invalid API key")
    return Principal(owner=key_id(token))
