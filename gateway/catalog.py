"""What the fleet serves: live workers, their models, and each model's tokenizer.

Both are read from Redis and cached briefly, so a request costs no Redis round trip for
them in the common case: the worker list for ``FLEET_CACHE_S``, a model's info until its
fingerprint changes (checked every ``MODEL_INFO_CHECK_S``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from gateway.tokenize import PromptTokenizer
from shared.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from shared.keys import Keys
from shared.model_info import ModelInfo

logger = logging.getLogger("tokenfleet.gateway")

FLEET_CACHE_S = 1.0
MODEL_INFO_CHECK_S = 5.0


@dataclass(slots=True)
class WorkerInfo:
    id: str
    model: str
    is_warm: bool
    last_seen: float  # unix seconds of the last heartbeat
    started_at: float  # unix seconds; 0 when the worker did not say


@dataclass(slots=True)
class ModelEntry:
    info: ModelInfo
    tokenizer: PromptTokenizer  # its ``fingerprint`` is the info's, computed once
    checked_at: float  # time.monotonic() of the last fingerprint check


@dataclass(slots=True)
class _FleetSnapshot:
    workers: list[WorkerInfo] = field(default_factory=list)
    taken_at: float = float("-inf")  # time.monotonic()

    @property
    def models(self) -> dict[str, list[WorkerInfo]]:
        models: dict[str, list[WorkerInfo]] = {}
        for worker in self.workers:
            models.setdefault(worker.model, []).append(worker)
        return models


def _float_or_zero(value: bytes | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


class Catalog:
    def __init__(self, redis: aioredis.Redis, keys: Keys, heartbeat_ttl_s: float, *,
                 scale_to_zero: bool = False) -> None:
        self._redis = redis
        self._keys = keys
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self.scale_to_zero = scale_to_zero  # a model with no live worker still takes work
        self._fleet = _FleetSnapshot()
        self._fleet_lock = asyncio.Lock()
        self._models: dict[str, ModelEntry] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}

    # --- workers --------------------------------------------------------------------------

    async def live_workers(self) -> list[WorkerInfo]:
        """Workers whose last heartbeat is within ``heartbeat_ttl_s`` (read now, no cache)."""
        since = time.time() - self._heartbeat_ttl_s
        rows = await self._redis.zrangebyscore(self._keys.workers, since, "+inf",
                                               withscores=True)
        if not rows:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker_id, _ in rows:
                pipe.hgetall(self._keys.worker(worker_id.decode()))
            hashes = await pipe.execute()
        workers = []
        for (worker_id, seen), fields in zip(rows, hashes, strict=True):
            model = fields.get(b"model")
            if not model:
                continue  # heartbeat hash expired or not written yet
            workers.append(WorkerInfo(
                id=worker_id.decode(), model=model.decode(),
                is_warm=fields.get(b"warm") == b"1", last_seen=float(seen),
                started_at=_float_or_zero(fields.get(b"started_at")),
            ))
        return workers

    async def served_models(self, *, fresh: bool = False) -> dict[str, list[WorkerInfo]]:
        """Model name -> its live workers (cached for ``FLEET_CACHE_S`` unless ``fresh``)."""
        if fresh or time.monotonic() - self._fleet.taken_at > FLEET_CACHE_S:
            async with self._fleet_lock:
                if fresh or time.monotonic() - self._fleet.taken_at > FLEET_CACHE_S:
                    workers = await self.live_workers()
                    self._fleet = _FleetSnapshot(workers, time.monotonic())
        return self._fleet.models

    async def require_model(self, name: str) -> None:
        """Raise ``ModelNotFoundError`` (404) unless a live worker serves ``name``."""
        if name in await self.served_models():
            return
        available = await self.served_models(fresh=True)  # a worker may have just started
        if name in available or name in await self.known_models():
            return
        listed = ", ".join(sorted(available)) or "none (no worker is running)"
        raise ModelNotFoundError(f"model {name!r} is not served here; available models: "
                                 f"{listed}", param="model")

    async def resolve_model(self, name: str | None) -> str:
        """The model a request is for: ``name``, or the only one served when it is omitted."""
        if name is not None:
            await self.require_model(name)
            return name
        served: dict[str, list[WorkerInfo]] | set[str] = await self.served_models()
        if len(served) != 1:
            served = await self.served_models(fresh=True)
        if not served:
            served = await self.known_models()
        if len(served) == 1:
            return next(iter(served))
        if not served:
            raise ModelNotFoundError("no model is served: no worker is running", param="model")
        raise InvalidRequestError(
            f"this fleet serves several models; set \"model\" to one of: "
            f"{', '.join(sorted(served))}", param="model")

    async def known_models(self) -> set[str]:
        """With ``scale_to_zero``: every model a worker ever published (``Keys.models``),
        served now or not; requests for them queue until a worker starts. Else empty."""
        if not self.scale_to_zero:
            return set()
        return {name.decode() for name in await self._redis.smembers(self._keys.models)}

    # --- model info and tokenizers --------------------------------------------------------

    async def model(self, name: str) -> ModelEntry:
        """The model's info and tokenizer, reloaded when the worker published a new one."""
        entry = self._models.get(name)
        if entry is not None and time.monotonic() - entry.checked_at < MODEL_INFO_CHECK_S:
            return entry
        lock = self._model_locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = self._models.get(name)
            if entry is not None and time.monotonic() - entry.checked_at < MODEL_INFO_CHECK_S:
                return entry
            entry = await self._refresh(name, entry)
            self._models[name] = entry
            return entry

    async def _refresh(self, name: str, entry: ModelEntry | None) -> ModelEntry:
        key = self._keys.model_info(name)
        if entry is not None:
            fingerprint = await self._redis.hget(key, "fingerprint")
            if fingerprint is not None and fingerprint.decode() == entry.tokenizer.fingerprint:
                entry.checked_at = time.monotonic()
                return entry
        mapping = await self._redis.hgetall(key)
        if not mapping:
            raise ServiceUnavailableError(f"model {name!r} has not published its model info "
                                          "yet; try again when its worker is ready")
        info = ModelInfo.from_mapping(mapping)
        if entry is not None and entry.tokenizer.fingerprint == info.fingerprint:
            tokenizer = entry.tokenizer
        else:  # parsing a real tokenizer.json takes a while: keep the event loop free
            tokenizer = await asyncio.to_thread(PromptTokenizer, info)
            logger.info("loaded tokenizer of model %s (fingerprint %s)", name, info.fingerprint)
        return ModelEntry(info=info, tokenizer=tokenizer, checked_at=time.monotonic())
