"""API keys: generated once, stored only as a SHA-256 digest in the hash ``Keys.api_keys``.

``tokenfleet keys create`` prints a key once; Redis holds ``digest -> record`` (msgpack:
id, name, creation time, revoked flag, per-key rate limits). Static keys from
``TOKENFLEET_API_KEYS`` need no Redis and get the same kind of record.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import asdict, dataclass

import msgpack
import redis
import redis.asyncio as aioredis

from shared.errors import TokenfleetError
from shared.keys import Keys

log = logging.getLogger(__name__)
KEY_PREFIX = "tf-"


@dataclass(slots=True)
class KeyRecord:
    id: str
    name: str
    created_at: float = 0.0
    revoked: bool = False
    rpm: int | None = None  # per-key override of TOKENFLEET_RATE_LIMIT_RPM
    tpm: int | None = None
    v: int = 1

    def pack(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> KeyRecord | None:
        """None for anything that is not a well-formed record (logged, never raised)."""
        try:
            raw = msgpack.unpackb(data, raw=False)
            if raw.get("v") != 1 or not isinstance(raw.get("id"), str):
                raise ValueError(f"unsupported record {raw!r}")
            return cls(id=raw["id"], name=str(raw.get("name", "")),
                       created_at=float(raw.get("created_at", 0.0)),
                       revoked=bool(raw.get("revoked", False)),
                       rpm=_opt_int(raw.get("rpm")), tpm=_opt_int(raw.get("tpm")))
        except (ValueError, TypeError, AttributeError, msgpack.ExtraData) as exc:
            log.warning("ignoring a malformed API key record: %s", exc)
            return None


def _opt_int(value: object) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str:
    """A stable, non-secret id for a key: what job records store as their owner."""
    return "key_" + digest(key)[:12]


def static_record(key: str) -> KeyRecord:
    return KeyRecord(id=key_id_of(key), name="static (TOKENFLEET_API_KEYS)")


def create_key(r: redis.Redis, keys: Keys, name: str, rpm: int | None = None,
               tpm: int | None = None) -> tuple[str, KeyRecord]:
    """A new key (returned once; only its digest is stored) and its record."""
    key = generate_key()
    record = KeyRecord(id=key_id_of(key), name=name, created_at=time.time(), rpm=rpm, tpm=tpm)
    r.hset(keys.api_keys, digest(key), record.pack())
    return key, record


def list_keys(r: redis.Redis, keys: Keys) -> list[KeyRecord]:
    records = [KeyRecord.unpack(v) for v in r.hvals(keys.api_keys)]
    return sorted((rec for rec in records if rec), key=lambda rec: rec.created_at)


def revoke_key(r: redis.Redis, keys: Keys, key_id: str) -> KeyRecord:
    for field, value in r.hgetall(keys.api_keys).items():
        record = KeyRecord.unpack(value)
        if record is not None and record.id == key_id:
            record.revoked = True
            r.hset(keys.api_keys, field, record.pack())
            return record
    raise TokenfleetError(f"no API key with id {key_id!r} (see `tokenfleet keys list`)")


async def lookup(r: aioredis.Redis, keys: Keys, key: str) -> KeyRecord | None:
    """The record of a presented key; None when unknown or revoked."""
    data = await r.hget(keys.api_keys, digest(key))
    record = KeyRecord.unpack(data) if data else None
    return None if record is None or record.revoked else record
