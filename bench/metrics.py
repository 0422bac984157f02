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

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted

    def itls(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in itertools.pairwise(times)]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(records: list[RequestRecord], wall_s: float,
              mean_batch: float | None = None) -> dict[str, float | int | None]:
    ok = [r for r in records if r.error is None and r.finished is not None]
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
        "requests_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "ttft_p50_ms": p(ttfts, 50), "ttft_p99_ms": p(ttfts, 99),
        "itl_p50_ms": p(itls, 50), "itl_p99_ms": p(itls, 99),
        "e2e_p50_ms": p(e2es, 50), "e2e_p99_ms": p(e2es, 99),
        "mean_batch": None if mean_batch is None else round(mean_batch, 2),
    }
