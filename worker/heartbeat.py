"""The worker's liveness record: a hash with a TTL plus a score in the fleet's sorted set.

A daemon thread with its own Redis connection writes ``WorkerStatus`` every
``heartbeat_interval_s``, so a long engine step never makes a busy worker look dead. The
queue loop updates the status object in place (plain attribute writes, no lock needed).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import redis

from shared.keys import Keys
from worker.engine.types import EngineStats

logger = logging.getLogger(__name__)

STATE_STARTING = "starting"
STATE_READY = "ready"
STATE_DRAINING = "draining"


@dataclass(slots=True)
class WorkerStatus:
    """What the heartbeat reports; written by the queue loop, read by the heartbeat thread."""

    worker_id: str
    model: str
    quantization: str = "none"
    dtype: str = ""
    state: str = STATE_STARTING
    is_warm: bool = False
    num_running: int = 0
    num_waiting: int = 0
    kv_tokens_used: int = 0  # KV-cache tokens the engine holds now
    kv_tokens_budget: int = 0  # its budget (TOKENFLEET_MAX_BATCH_TOKENS)
    prefix_cache_hits: int = 0  # requests that reused a cached prompt prefix (cumulative)
    prefix_cache_misses: int = 0  # requests that found none (cumulative)
    prefix_cache_hit_tokens: int = 0  # prompt tokens copied instead of prefilled (cumulative)
    prefix_cache_tokens: int = 0  # tokens the prefix pool holds now
    spec_proposed: int = 0  # speculative decoding: proposed tokens verified (since start)
    spec_accepted: int = 0  # of those, accepted
    compiled: str = "off"  # compiled decode step: off/warming/active/failed (compile_warmup.py)
    started_at: float = field(default_factory=time.time)

    def update(self, stats: EngineStats) -> None:
        """Take the engine's numbers after a step."""
        self.num_running = stats.num_running
        self.num_waiting = stats.num_waiting
        self.kv_tokens_used = stats.kv_tokens_used
        self.kv_tokens_budget = stats.kv_tokens_budget
        self.prefix_cache_hits = stats.prefix_cache_hits
        self.prefix_cache_misses = stats.prefix_cache_misses
        self.prefix_cache_hit_tokens = stats.prefix_cache_hit_tokens
        self.prefix_cache_tokens = stats.prefix_cache_tokens
        self.spec_proposed = stats.spec_proposed
        self.spec_accepted = stats.spec_accepted
        self.compiled = stats.compiled

    def to_mapping(self) -> dict[str, str]:
        return {
            "id": self.worker_id,
            "model": self.model,
            "quantization": self.quantization,
            "dtype": self.dtype,
            "batch_size": str(self.num_running),
            "waiting": str(self.num_waiting),
            "kv_tokens_used": str(self.kv_tokens_used),
            "kv_tokens_budget": str(self.kv_tokens_budget),
            "prefix_cache_hits": str(self.prefix_cache_hits),
            "prefix_cache_misses": str(self.prefix_cache_misses),
            "prefix_cache_hit_tokens": str(self.prefix_cache_hit_tokens),
            "prefix_cache_tokens": str(self.prefix_cache_tokens),
            "spec_proposed": str(self.spec_proposed),
            "spec_accepted": str(self.spec_accepted),
            "compiled": self.compiled,
            "warm": "1" if self.is_warm else "0",
            "started_at": f"{self.started_at:.3f}",
            "state": self.state,
        }


class Heartbeat:
    def __init__(self, client: redis.Redis, keys: Keys, status: WorkerStatus,
                 interval_s: float, ttl_s: float) -> None:
        self.client = client
        self.keys = keys
        self.status = status
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._wake = threading.Event()
        self._is_stopping = False
        self._is_failing = False
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, deregister: bool = True) -> None:
        """Stop the thread; on a clean exit remove this worker from the fleet right away."""
        self._is_stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5.0)
        if deregister:
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.delete(self.keys.worker(self.status.worker_id))
                pipe.zrem(self.keys.workers, self.status.worker_id)
                pipe.execute()
            except redis.RedisError as exc:
                logger.warning("could not deregister worker: %s", exc)
        self.client.close()

    def beat(self) -> None:
        """One heartbeat: hash + TTL, sorted-set score, prune workers gone silent."""
        now = time.time()
        key = self.keys.worker(self.status.worker_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=self.status.to_mapping())
        pipe.expire(key, max(1, math.ceil(self.ttl_s)))
        pipe.zadd(self.keys.workers, {self.status.worker_id: now})
        pipe.zremrangebyscore(self.keys.workers, "-inf", now - self.ttl_s)
        pipe.execute()

    def _run(self) -> None:
        while not self._is_stopping:
            self._beat_logged()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _beat_logged(self) -> None:
        try:
            self.beat()
        except redis.RedisError as exc:
            if not self._is_failing:
                logger.warning("heartbeat failed (will retry every %.1f s): %s",
                               self.interval_s, exc)
            self._is_failing = True
            return
        if self._is_failing:
            logger.info("heartbeat restored")
        self._is_failing = False
