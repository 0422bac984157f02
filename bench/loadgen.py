"""Where requests come from: a closed loop (N clients, each sending its next request when the
previous one ends) or an open loop (Poisson arrivals at a fixed rate).

Every system's driver, in-process or over HTTP, talks to a ``Load`` the same way:

- ``start(now)``: the submissions due at the start (closed loop: one per client);
- ``due(now)``: arrivals whose time has come (open loop);
- ``finished(client, now)``: a request of ``client`` ended; its next one, if any (closed loop);
- ``next_arrival()``: when the next open-loop arrival is due (``None``: no more arrivals);
- ``is_exhausted``: nothing more will ever be submitted.

A submission's ``submitted`` time is when the request *should* have been sent (for the open
loop, its scheduled arrival), so a driver that falls behind shows it as latency instead of
quietly sending later (no coordinated omission).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Protocol

from bench.workload import BenchRequest

OPEN_LOOP_CLIENT = -1  # the ``client`` of open-loop submissions: nobody waits to send more


@dataclass(frozen=True, slots=True)
class Submission:
    client: int
    request: BenchRequest
    submitted: float  # time.perf_counter() seconds

    @property
    def request_id(self) -> str:
        return f"c{self.client}-{self.request.index}"


class Load(Protocol):
    def start(self, now: float) -> list[Submission]: ...

    def due(self, now: float) -> list[Submission]: ...

    def finished(self, client: int, now: float) -> list[Submission]: ...

    def next_arrival(self) -> float | None: ...

    @property
    def is_exhausted(self) -> bool: ...


class ClosedLoop:
    """``len(per_client)`` clients; client ``c`` sends ``per_client[c]`` one after another.

    With ``duration_s``, clients instead walk their list round and round (fresh request
    indices each lap) and stop sending once ``duration_s`` has passed since ``start``;
    requests in flight then finish.
    """

    def __init__(self, per_client: list[list[BenchRequest]],
                 duration_s: float | None = None) -> None:
        self.per_client = per_client
        self.duration_s = duration_s
        self._next = [0] * len(per_client)
        self._total = max(1, sum(len(q) for q in per_client))
        self._deadline: float | None = None
        self._num_active = 0

    @property
    def num_clients(self) -> int:
        return len(self.per_client)

    def start(self, now: float) -> list[Submission]:
        if self.duration_s is not None:
            self._deadline = now + self.duration_s
        out = [s for c in range(self.num_clients) if (s := self._take(c, now)) is not None]
        self._num_active = len(out)
        return out

    def due(self, now: float) -> list[Submission]:
        return []

    def finished(self, client: int, now: float) -> list[Submission]:
        nxt = self._take(client, now)
        if nxt is None:
            self._num_active -= 1
            return []
        return [nxt]

    def next_arrival(self) -> float | None:
        return None

    @property
    def is_exhausted(self) -> bool:
        return self._num_active <= 0

    def _take(self, client: int, now: float) -> Submission | None:
        mine = self.per_client[client]
        pos = self._next[client]
        if not mine:
            return None
        if self._deadline is None:
            if pos >= len(mine):
                return None
        elif now >= self._deadline:
            return None
        self._next[client] = pos + 1
        lap, slot = divmod(pos, len(mine))
        request = mine[slot]
        if lap:
            request = replace(request, index=request.index + lap * self._total)
        return Submission(client, request, now)


class OpenLoop:
    """Requests arrive at fixed times (offsets in seconds from ``start``), whoever is busy."""

    def __init__(self, requests: list[BenchRequest], offsets_s: list[float]) -> None:
        if len(requests) != len(offsets_s):
            raise ValueError("one arrival offset per request")
        self._pending = sorted(zip(offsets_s, range(len(requests)), requests, strict=True))
        self._pending.reverse()  # pop() from the end = the earliest
        self._start = 0.0

    def start(self, now: float) -> list[Submission]:
        self._start = now
        return self.due(now)

    def due(self, now: float) -> list[Submission]:
        out = []
        while self._pending and self._start + self._pending[-1][0] <= now:
            offset, _, request = self._pending.pop()
            out.append(Submission(OPEN_LOOP_CLIENT, request, self._start + offset))
        return out

    def finished(self, client: int, now: float) -> list[Submission]:
        return []

    def next_arrival(self) -> float | None:
        return self._start + self._pending[-1][0] if self._pending else None

    @property
    def is_exhausted(self) -> bool:
        return not self._pending


def poisson_offsets(rate: float, count: int | None = None, duration_s: float | None = None,
                    seed: int = 0) -> list[float]:
    """Arrival offsets of a Poisson process at ``rate``/s: ``count`` of them, or all those
    before ``duration_s`` (at least one). Seeded, so every system sees the same arrivals."""
    if rate <= 0:
        raise ValueError("--rate must be > 0")
    if count is None and duration_s is None:
        raise ValueError("give a count or a duration")
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if count is not None and len(out) >= count:
            return out
        if duration_s is not None and t > duration_s and out:
            return out
        out.append(t)
