"""API keys: generated once, stored only as a SHA-256 digest in the hash ``Keys.api_keys``.

A key is ``tf-`` and 32 URL-safe characters (192 random bits). ``tokenfleet keys create``
prints it once; Redis holds ``sha256 hex digest -> record`` (msgpack: version, id, name,
creation time, revoked flag, per-key rate limits). The id (``key_`` and the first 8 hex
digits of the digest) is not secret: ``keys list``/``keys revoke`` and job owners use it.

Static keys from ``TOKENFLEET_API_KEYS`` need no Redis and get the same kind of record.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import msgpack
import redis
import redis.asyncio as aioredis

from shared.errors import TokenfleetError
from shared.keys import Keys

log = logging.getLogger(__name__)

KEY_PREFIX = "tf-"
KEY_ID_PREFIX = "key_"
RECORD_VERSION = 1
MAX_KEY_LENGTH = 256  # longer bearer tokens are refused without hashing or a lookup
_CREATE_ATTEMPTS = 8  # new keys whose id collides with an existing one are drawn again


@dataclass(slots=True)
class KeyRecord:
    id: str
    name: str
    created_at: float = 0.0
    revoked: bool = False
    rpm: int | None = None  # per-key override of TOKENFLEET_RATE_LIMIT_RPM (0: unlimited)
    tpm: int | None = None  # per-key override of TOKENFLEET_RATE_LIMIT_TPM (0: unlimited)
    v: int = RECORD_VERSION

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> KeyRecord | None:
        """None for anything that is not a well-formed record (logged, never raised)."""
        try:
            raw = msgpack.unpackb(data, raw=False)
            if raw.get("v") != RECORD_VERSION or not isinstance(raw.get("id"), str):
                raise ValueError(f"unsupported record version or id: {raw.get('v')!r}")
            return cls(id=raw["id"], name=str(raw.get("name", "")),
                       created_at=float(raw.get("created_at", 0.0)),
                       revoked=bool(raw.get("revoked", False)),
                       rpm=_opt_int(raw.get("rpm")), tpm=_opt_int(raw.get("tpm")))
        except (ValueError, TypeError, AttributeError) as exc:  # msgpack errors are ValueErrors
            log.warning("ignoring a malformed API key record: %s", exc)
            return None


def _opt_int(value: object) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)  # 24 bytes -> 32 characters


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_id(key_digest: str) -> str:
    """The public id of the key with this digest."""
    return KEY_ID_PREFIX + key_digest[:8]


# --- static keys (TOKENFLEET_API_KEYS) --------------------------------------------------------


def static_record(key: str) -> KeyRecord:
    """The record of a static key: its id comes from the digest, limits from the settings."""
    return KeyRecord(id=key_id(digest(key)), name="static (TOKENFLEET_API_KEYS)")


def static_records(static_keys: Sequence[str]) -> dict[str, KeyRecord]:
    """Digest -> record for each configured static key (computed once per gateway)."""
    return {digest(key): static_record(key) for key in static_keys}


def match_static(key_digest: str, records: dict[str, KeyRecord]) -> KeyRecord | None:
    """The static record whose digest equals ``key_digest``, in constant time per key."""
    found = None
    for known, record in records.items():
        if hmac.compare_digest(key_digest, known):  # no early exit: every key is compared
            found = record
    return found


# --- stored keys (tokenfleet keys create|list|revoke) -----------------------------------------


def create_key(r: redis.Redis, keys: Keys, name: str, rpm: int | None = None,
               tpm: int | None = None) -> tuple[str, KeyRecord]:
    """A new key (returned once; only its digest is stored) and its record."""
    for limit, flag in ((rpm, "--rpm"), (tpm, "--tpm")):
        if limit is not None and limit < 0:
            raise TokenfleetError(f"{flag} must be >= 0 (0: unlimited)")
    taken = {record.id for record in list_keys(r, keys)}
    for _ in range(_CREATE_ATTEMPTS):
        key = generate_key()
        key_digest = digest(key)
        record = KeyRecord(id=key_id(key_digest), name=name, created_at=time.time(),
                           rpm=rpm, tpm=tpm)
        if record.id not in taken and r.hsetnx(keys.api_keys, key_digest, record.pack()):
            return key, record
    raise TokenfleetError("could not draw an unused key id; try again")


def list_keys(r: redis.Redis, keys: Keys) -> list[KeyRecord]:
    records = [KeyRecord.unpack(v) for v in r.hvals(keys.api_keys)]
    return sorted((rec for rec in records if rec), key=lambda rec: rec.created_at)


def revoke_key(r: redis.Redis, keys: Keys, id_or_prefix: str) -> KeyRecord:
    """Mark the key with this id (or the one key whose id starts with it) revoked.

    Revoking a revoked key is a no-op that returns its record; an unknown or ambiguous
    prefix is a ``TokenfleetError``. The record is rewritten, the digest stays: a revoked
    key can never come back by being created again.
    """
    wanted = id_or_prefix.strip()
    found: dict[bytes, KeyRecord] = {}
    for field, value in r.hgetall(keys.api_keys).items():
        record = KeyRecord.unpack(value)
        if record is not None and wanted and record.id.startswith(wanted):
            found[field] = record
    exact = {field: rec for field, rec in found.items() if rec.id == wanted}
    matches = exact or found
    if not matches:
        raise TokenfleetError(f"no API key with id {wanted!r} (see `tokenfleet keys list`)")
    if len(matches) > 1:
        ids = ", ".join(sorted(rec.id for rec in matches.values()))
        raise TokenfleetError(f"{wanted!r} matches several keys ({ids}); give the whole id")
    [(field, record)] = matches.items()
    record.revoked = True
    r.hset(keys.api_keys, field, record.pack())
    return record


async def lookup(r: aioredis.Redis, keys: Keys, key_digest: str) -> KeyRecord | None:
    """The stored record of the key with this digest; None when unknown or revoked."""
    data = await r.hget(keys.api_keys, key_digest)
    record = KeyRecord.unpack(data) if data else None
    return None if record is None or record.revoked else record


async def count_keys(r: aioredis.Redis, keys: Keys) -> int:
    return int(await r.hlen(keys.api_keys))
