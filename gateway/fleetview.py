"""The fleet as Redis sees it now, read in two pipelined round trips: live workers (their
heartbeat hashes), the models (served now or ever, ``Keys.models``), each model's queue
per lane (``shared.queue_depth``), its dead letters, and the autoscaler's last decision.
Optionally also the dashboard's history (``shared.telemetry``).

``GET /v1/fleet`` shows it as JSON and ``/metrics`` turns it into gauges. Fleet-wide
numbers are the same on every gateway: aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from batches.store import batch_view
from shared.keys import LANES, Keys
from shared.queue_depth import NUM_COMMANDS_PER_LANE, LaneDepth, parse_depths, queue_commands
from shared.telemetry import (
    BUCKET_S,
    WINDOW_S,
    BucketCounts,
    JobSummary,
    merge,
    parse_window,
    queue_window_read,
    window_buckets,
)

SUMMARY_S = 60  # the dashboard's headline rates and TTFT cover the last minute

MAX_BATCHES = 20  # active batches shown (oldest expiry first)
PER_MODEL_COMMANDS = NUM_COMMANDS_PER_LANE * len(LANES) + 1  # lanes, then the dead letters


@dataclass(slots=True)
class WorkerView:
    id: str
    model: str
    state: str
    is_warm: bool
    dtype: str
    quantization: str
    num_running: int
    num_waiting: int
    kv_tokens_used: int
    kv_tokens_budget: int
    started_at: float
    last_seen: float

    @property
    def kv_usage(self) -> float | None:
        return self.kv_tokens_used / self.kv_tokens_budget if self.kv_tokens_budget else None

    def to_json(self, now_s: float) -> dict[str, Any]:
        data = asdict(self)
        data["kv_usage"] = self.kv_usage
        data["uptime_s"] = round(now_s - self.started_at, 1) if self.started_at else None
        data["last_seen_s"] = round(max(0.0, now_s - self.last_seen), 2)
        return data


@dataclass(slots=True)
class ModelView:
    name: str
    lanes: list[LaneDepth]
    dead_letters: int
    scaler: dict[str, Any] | None = None  # the autoscaler's last decision for this model

    @property
    def depth(self) -> int:
        return sum(lane.depth for lane in self.lanes)


@dataclass(slots=True)
class BatchProgress:
    """A batch not yet in a final status, with its line counts."""

    id: str
    status: str
    total: int
    completed: int
    failed: int
    created_at: int | None


@dataclass(slots=True)
class FleetView:
    taken_at: float
    workers: list[WorkerView]
    models: list[ModelView]
    batches: list[BatchProgress] = field(default_factory=list)
    history: list[BucketCounts] = field(default_factory=list)
    recent_jobs: list[JobSummary] = field(default_factory=list)

    def workers_of(self, model: str) -> list[WorkerView]:
        return [w for w in self.workers if w.model == model]

    def to_json(self) -> dict[str, Any]:
        now = self.taken_at
        return {
            "object": "fleet",
            "time": now,
            "workers": [w.to_json(now) for w in self.workers],
            "models": [_model_json(m, self.workers_of(m.name)) for m in self.models],
            "series": {"bucket_s": BUCKET_S, "window_s": WINDOW_S,
                       "points": [bucket.point() for bucket in self.history]},
            "summary": self.summary(),
            "recent_jobs": [asdict(job) for job in self.recent_jobs],
            "batches": [asdict(batch) for batch in self.batches],
        }

    def summary(self) -> dict[str, Any]:
        """Tokens/s and TTFT over the last ``SUMMARY_S``; finished requests over the window."""
        last = merge(self.history[-(SUMMARY_S // BUCKET_S):])
        point = last.point()
        return {
            "window_s": SUMMARY_S,
            "gen_tokens_per_s": point["gen_tokens_per_s"],
            "ttft_p50_s": point["ttft_p50_s"],
            "ttft_p99_s": point["ttft_p99_s"],
            "finished_in_window": sum(bucket.finished for bucket in self.history),
        }


def _model_json(model: ModelView, workers: list[WorkerView]) -> dict[str, Any]:
    return {
        "name": model.name,
        "workers": len(workers),
        "warm_workers": sum(1 for w in workers if w.is_warm),
        "requests_running": sum(w.num_running for w in workers),
        "queue_depth": model.depth,
        "lanes": [{"lane": d.lane, "lag": d.lag, "pending": d.pending, "depth": d.depth}
                  for d in model.lanes],
        "dead_letters": model.dead_letters,
        "scaler": model.scaler,
    }


async def read_fleet(redis: aioredis.Redis, keys: Keys, heartbeat_ttl_s: float, *,
                     with_history: bool = False) -> FleetView:
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(keys.workers, now - heartbeat_ttl_s, "+inf", withscores=True)
        pipe.smembers(keys.models)
        pipe.hgetall(keys.fleet_scaler)
        pipe.zrange(keys.active_batches, 0, MAX_BATCHES - 1)
        rows, known, scaler, batch_ids = await pipe.execute()
    ids = [worker_id.decode() for worker_id, _ in rows]
    buckets = window_buckets(now) if with_history else []
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.hgetall(keys.worker(worker_id))
        for batch_id in batch_ids:
            pipe.hgetall(keys.batch(batch_id.decode()))
        replies = await pipe.execute() if ids or batch_ids else []
    hashes, batch_hashes = replies[:len(ids)], replies[len(ids):]
    workers = [_worker(worker_id, seen, fields) for (worker_id, seen), fields
               in zip(rows, hashes, strict=True) if fields.get(b"model")]
    names = sorted({m.decode() for m in known} | {w.model for w in workers})
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            queue_commands(pipe, keys, name)
            pipe.xlen(keys.dead_letter_stream(name))
        if with_history:
            queue_window_read(pipe, keys, buckets)
        replies = await pipe.execute(raise_on_error=False)
    models = []
    for index, name in enumerate(names):
        chunk = replies[index * PER_MODEL_COMMANDS:(index + 1) * PER_MODEL_COMMANDS]
        dead = chunk[-1] if isinstance(chunk[-1], int) else 0
        models.append(ModelView(name, parse_depths(name, chunk[:-1]), dead,
                                _scaler_of(scaler, name)))
    batches = [_batch(fields) for fields in batch_hashes if fields]
    view = FleetView(taken_at=now, workers=workers, models=models, batches=batches)
    if with_history:
        view.history, view.recent_jobs = parse_window(
            buckets, replies[len(names) * PER_MODEL_COMMANDS:])
    return view


def _worker(worker_id: bytes, seen: float, fields: dict[bytes, bytes]) -> WorkerView:
    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode("utf-8", "replace")

    def number(name: str) -> float:
        try:
            return float(fields.get(name.encode()) or 0)
        except ValueError:
            return 0.0

    return WorkerView(
        id=worker_id.decode(), model=text("model"), state=text("state") or "unknown",
        is_warm=text("warm") == "1", dtype=text("dtype"),
        quantization=text("quantization") or "none", num_running=int(number("batch_size")),
        num_waiting=int(number("waiting")), kv_tokens_used=int(number("kv_tokens_used")),
        kv_tokens_budget=int(number("kv_tokens_budget")), started_at=number("started_at"),
        last_seen=float(seen),
    )


def _batch(fields: dict[bytes, bytes]) -> BatchProgress:
    view = batch_view(fields)
    counts = view["request_counts"]
    return BatchProgress(id=view["id"] or "", status=view["status"] or "unknown",
                         total=counts["total"], completed=counts["completed"],
                         failed=counts["failed"], created_at=view["created_at"])


def _scaler_of(scaler: dict[bytes, bytes], model: str) -> dict[str, Any] | None:
    raw = scaler.get(model.encode())
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
