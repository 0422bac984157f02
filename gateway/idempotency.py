"""``Idempotency-Key``: a retried POST gets the first request's job, and nothing is queued.

As Stripe does it: a key (1 to 255 printable ASCII characters) is scoped to the API key
that sends it and bound, for ``TOKENFLEET_IDEMPOTENCY_TTL_S``, to the fingerprint of the
first request (endpoint + the JSON body, canonicalised) and to the job it created. The
binding is written by ``ENQUEUE_LUA`` in the same atomic step as the job, so of any number
of concurrent retries exactly one queues a job; the others, and every later retry, replay
it (the same id and status code, and ``Idempotent-Replayed: true``). The same key with a
different request is a 422. A request refused before it is queued (400, 429, 503) binds
nothing: it can be retried with the same key.

A binding is looked up before the request is validated, so a retry of a queued request
costs one Redis read and spends no rate limit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import redis.asyncio as aioredis
from fastapi import Request

from shared.errors import IdempotencyKeyReusedError, InvalidRequestError
from shared.keys import Keys

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Claim:
    """An ``Idempotency-Key`` of a request being submitted: where its binding lives, what
    it must match, and the job it is already bound to (None: not yet)."""

    key: str  # the binding's Redis key
    fingerprint: str
    ttl_s: int
    bound_job: str | None = None


class IdempotentReplay(Exception):
    """Raised by ``enqueue`` when a concurrent request with the same key queued first."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


def check_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not value.isascii() or not value.isprintable():
        raise InvalidRequestError(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            "(a UUID is a good choice)", param=HEADER, code="invalid_idempotency_key")
    return value


def fingerprint(endpoint: str, body: bytes) -> str:
    """SHA-256 of the endpoint and the canonical JSON of the body (key order and spacing do
    not matter; values do)."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
    except ValueError:
        canonical = body.decode("utf-8", "replace")
    return hashlib.sha256(f"{endpoint}\n{canonical}".encode()).hexdigest()


def mismatch() -> IdempotencyKeyReusedError:
    return IdempotencyKeyReusedError(
        f"this {HEADER} was already used with a different request (another body or "
        "endpoint); a retry must send exactly the same request: use a new key for a new one",
        param=HEADER, code="idempotency_key_reused")


async def claim_key(redis: aioredis.Redis, keys: Keys, owner: str, request: Request,
                    header: str | None, ttl_s: int) -> Claim | None:
    """The request's claim (None without the header); 422 if the key is bound to another
    request, else the job it is bound to, if any."""
    if header is None:
        return None
    digest = hashlib.sha256(check_key(header).encode()).hexdigest()
    endpoint = request.url.path
    claim = Claim(key=keys.idempotency(owner, digest),
                  fingerprint=fingerprint(endpoint, await request.body()), ttl_s=ttl_s)
    bound_fingerprint, bound_job = await redis.hmget(claim.key, ["fingerprint", "job"])
    if bound_job is None:
        return claim
    return bound(claim, bound_job.decode(), (bound_fingerprint or b"").decode())


def bound(claim: Claim, job_id: str, bound_fingerprint: str) -> Claim:
    """``claim`` bound to ``job_id``; 422 when that job was made by another request."""
    if bound_fingerprint != claim.fingerprint:
        raise mismatch()
    return Claim(key=claim.key, fingerprint=claim.fingerprint, ttl_s=claim.ttl_s,
                 bound_job=job_id)
