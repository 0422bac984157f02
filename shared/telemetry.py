"""The fleet's recent history in Redis, for the dashboard: one wire shape, one module.

Every worker adds what it did in the last ``SAMPLE_INTERVAL_S`` to the hash of the current
``BUCKET_S`` time bucket (``Keys.fleet_series``: token counts, finished requests, and a
time-to-first-token histogram as counts per bucket of ``TTFT_BUCKETS_S``), and pushes the
summaries of the requests it finished to a capped list (``Keys.fleet_recent_jobs``). That is
a handful of commands per worker every two seconds, nothing per token or per request. A
gateway reads the last ``WINDOW_S`` of buckets in one pipeline (``GET /v1/fleet``), so every
gateway shows the same numbers and a reload keeps the history. Percentiles are estimated
from the histogram as Prometheus' ``histogram_quantile`` does (linear within a bucket).

Workers write with the blocking client and gateways read with the asyncio one: both queue
commands on a pipeline the caller executes (``queue_sample`` / ``queue_window_read``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.keys import Keys

BUCKET_S = 5  # resolution of the dashboard's charts
WINDOW_S = 600  # how far back they go
SERIES_TTL_S = WINDOW_S + 120
SAMPLE_INTERVAL_S = 2.0  # how often a worker writes its counts
RECENT_JOBS = 50  # finished requests kept in the list

# vLLM's buckets for serving latencies (seconds), shared with the Prometheus histograms.
TTFT_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

FIELD_GEN_TOKENS = "gen_tokens"
FIELD_PROMPT_TOKENS = "prompt_tokens"
FIELD_FINISHED = "finished"
TTFT_FIELD_PREFIX = "ttft:"  # + bucket index; index len(TTFT_BUCKETS_S) is +Inf


def bucket_of(unix_s: float) -> int:
    return int(unix_s // BUCKET_S)


def ttft_bucket_index(seconds: float) -> int:
    """The index of the first upper bound >= ``seconds`` (len(TTFT_BUCKETS_S) for +Inf)."""
    for index, bound in enumerate(TTFT_BUCKETS_S):
        if seconds <= bound:
            return index
    return len(TTFT_BUCKETS_S)


@dataclass(slots=True)
class JobSummary:
    """One finished request as the dashboard lists it (timings in seconds, None = unknown)."""

    id: str
    model: str
    lane: str
    worker: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished_at: float = 0.0  # unix seconds
    queue_s: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None

    def pack(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def unpack(cls, raw: bytes) -> JobSummary | None:
        try:
            data = json.loads(raw)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(slots=True)
class Sample:
    """What one worker did since its previous sample."""

    gen_tokens: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    ttft_counts: dict[int, int] = field(default_factory=dict)  # bucket index -> requests
    jobs: list[JobSummary] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.gen_tokens or self.prompt_tokens or self.finished or self.jobs)

    def add_ttft(self, seconds: float) -> None:
        index = ttft_bucket_index(seconds)
        self.ttft_counts[index] = self.ttft_counts.get(index, 0) + 1


def queue_sample(pipe: Any, keys: Keys, sample: Sample, now_s: float) -> None:
    """Queue the commands that add ``sample`` to the current bucket and the recent list."""
    key = keys.fleet_series(bucket_of(now_s))
    counts = {FIELD_GEN_TOKENS: sample.gen_tokens, FIELD_PROMPT_TOKENS: sample.prompt_tokens,
              FIELD_FINISHED: sample.finished}
    counts.update({f"{TTFT_FIELD_PREFIX}{i}": n for i, n in sample.ttft_counts.items()})
    for name, value in counts.items():
        if value:
            pipe.hincrby(key, name, value)
    pipe.expire(key, SERIES_TTL_S)
    if sample.jobs:
        recent = keys.fleet_recent_jobs
        pipe.lpush(recent, *[job.pack() for job in sample.jobs])
        pipe.ltrim(recent, 0, RECENT_JOBS - 1)


@dataclass(slots=True)
class BucketCounts:
    """The fleet's counts in one bucket (or merged over several)."""

    t: int  # unix seconds at the (first) bucket's start
    span_s: int  # seconds covered
    gen_tokens: int = 0
    prompt_tokens: int = 0
    finished: int = 0
    ttft_counts: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS_S) + 1))

    def point(self) -> dict[str, Any]:
        """Rates per second and TTFT percentiles (None: no request got a first token)."""
        return {
            "t": self.t,
            "gen_tokens_per_s": self.gen_tokens / self.span_s,
            "prompt_tokens_per_s": self.prompt_tokens / self.span_s,
            "requests_per_s": self.finished / self.span_s,
            "ttft_p50_s": histogram_quantile(0.5, self.ttft_counts),
            "ttft_p99_s": histogram_quantile(0.99, self.ttft_counts),
        }


def merge(buckets: Sequence[BucketCounts]) -> BucketCounts:
    merged = BucketCounts(t=buckets[0].t if buckets else 0,
                          span_s=sum(b.span_s for b in buckets) or BUCKET_S)
    for bucket in buckets:
        merged.gen_tokens += bucket.gen_tokens
        merged.prompt_tokens += bucket.prompt_tokens
        merged.finished += bucket.finished
        merged.ttft_counts = [a + b for a, b in
                              zip(merged.ttft_counts, bucket.ttft_counts, strict=True)]
    return merged


def window_buckets(now_s: float) -> list[int]:
    """The complete buckets of the last ``WINDOW_S`` (the current, partial one excluded)."""
    last = bucket_of(now_s) - 1
    return list(range(last - WINDOW_S // BUCKET_S + 1, last + 1))


def queue_window_read(pipe: Any, keys: Keys, buckets: Sequence[int]) -> None:
    for bucket in buckets:
        pipe.hgetall(keys.fleet_series(bucket))
    pipe.lrange(keys.fleet_recent_jobs, 0, RECENT_JOBS - 1)


def parse_window(buckets: Sequence[int], replies: Sequence[Any],
                 ) -> tuple[list[BucketCounts], list[JobSummary]]:
    """The replies of ``queue_window_read`` as bucket counts and recent jobs."""
    counts = [_bucket(bucket, _int_fields(raw)) for bucket, raw in
              zip(buckets, replies[:len(buckets)], strict=True)]
    raw_jobs = replies[len(buckets)]
    raw_jobs = raw_jobs if isinstance(raw_jobs, list) else []
    jobs = [job for job in (JobSummary.unpack(raw) for raw in raw_jobs) if job is not None]
    return counts, jobs


def _int_fields(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    fields = {}
    for name, value in raw.items():
        key = name.decode() if isinstance(name, bytes) else str(name)
        try:
            fields[key] = int(value)
        except (TypeError, ValueError):
            continue
    return fields


def _bucket(bucket: int, fields: dict[str, int]) -> BucketCounts:
    return BucketCounts(
        t=bucket * BUCKET_S, span_s=BUCKET_S,
        gen_tokens=fields.get(FIELD_GEN_TOKENS, 0),
        prompt_tokens=fields.get(FIELD_PROMPT_TOKENS, 0),
        finished=fields.get(FIELD_FINISHED, 0),
        ttft_counts=[fields.get(f"{TTFT_FIELD_PREFIX}{i}", 0)
                     for i in range(len(TTFT_BUCKETS_S) + 1)],
    )


def histogram_quantile(q: float, counts: Sequence[int],
                       bounds: Sequence[float] = TTFT_BUCKETS_S) -> float | None:
    """Prometheus' estimate: find the bucket holding rank ``q * total`` and interpolate
    linearly inside it (from 0 for the first bucket; the +Inf bucket answers its lower
    bound). ``counts`` are per bucket (not cumulative), ``len(bounds) + 1`` of them."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index > 0 else 0.0
            upper = bounds[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]
