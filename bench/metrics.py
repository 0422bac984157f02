"""Per-request timings and the summary every system reports."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """Times in seconds on one monotonic clock; ``token_times`` holds each arrival of text."""

    submitted: float
    output_tokens: int = 0
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    client: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted

    def itls(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in itertools.pairwise(times)]


@dataclass(slots=True)
class RunResult:
    """What one system at one load point produced."""

    records: list[RequestRecord]
    wall_s: float
    mean_batch: float | None = None  # mean running batch size, where the system exposes one
    cpu_cores: dict[str, float] | None = None  # CPU-seconds per wall second, per process


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def steady_window(records: list[RequestRecord]) -> tuple[float, float] | None:
    """From the first submission until the first client has nothing left to send: every
    client is busy all along, so the rate inside excludes the closed loop's drain tail.
    None for an open loop (clients numbered below 0): it has no clients to run dry."""
    if any(r.client < 0 for r in records):
        return None
    done_at: dict[int, float] = {}
    for r in records:
        if r.finished is not None:
            done_at[r.client] = max(done_at.get(r.client, 0.0), r.finished)
    if not done_at:
        return None
    start = min(r.submitted for r in records)
    end = min(done_at.values())
    return (start, end) if end > start else None


def _tokens_within(records: list[RequestRecord], start: float, end: float) -> int:
    total = 0
    for r in records:
        if len(r.token_times) == r.output_tokens:  # one arrival per token: count each
            total += sum(1 for t in r.token_times if start <= t <= end)
        elif r.finished is not None and start <= r.finished <= end:  # whole answer at once
            total += r.output_tokens
    return total


def summarize(records: list[RequestRecord], wall_s: float,
              mean_batch: float | None = None) -> dict[str, float | int | None]:
    ok = [r for r in records if r.error is None and r.finished is not None]
    window = steady_window(ok)
    steady = None
    if window is not None:
        steady = round(_tokens_within(ok, *window) / (window[1] - window[0]), 2)
    tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itls()]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    ms = 1000.0

    def p(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value * ms, 2)

    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "output_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "output_tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "steady_tokens_per_s": steady,
        "requests_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "ttft_p50_ms": p(ttfts, 50), "ttft_p99_ms": p(ttfts, 99),
        "itl_p50_ms": p(itls, 50), "itl_p99_ms": p(itls, 99),
        "e2e_p50_ms": p(e2es, 50), "e2e_p99_ms": p(e2es, 99),
        "mean_batch": None if mean_batch is None else round(mean_batch, 2),
    }
