"""A worker's Prometheus metrics (vLLM's names, ``tokenfleet:`` prefix) and its telemetry
sample for the dashboard, both fed by the queue loop through a few ``on_*`` calls.

Timings per request run from ``created_at`` (when the gateway accepted it, unix seconds on
the gateway's clock: keep hosts in NTP sync) to what this worker saw:
queue time = admitted here; TTFT = first generated token; e2e = finished. Inter-token
latency is the gap between a request's consecutive token steps (monotonic clock).

The loop thread writes; the telemetry thread takes the sample (``take_sample``) under a
lock; Prometheus' own types are thread-safe. ``worker.http_server`` serves ``/metrics``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from shared.protocol import GenerateRequest
from shared.telemetry import (
    ITL_BUCKETS_S,
    REQUEST_LATENCY_BUCKETS_S,
    STEP_DURATION_BUCKETS_S,
    TTFT_BUCKETS_S,
    JobSummary,
    Sample,
)
from worker.engine.types import COMPILE_STATES, EngineStats, RequestOutput
from worker.startup import STAGES, StartupClock

PREFIX = "tokenfleet:"
TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
FINISH_REASONS = ("stop", "length", "cancelled", "error", "timeout")


@dataclass(slots=True)
class _Timer:
    created_at: float  # unix, from the request
    admitted_at: float  # unix
    lane: str
    num_prompt_tokens: int
    last_token_at: float | None = None  # time.monotonic() of the latest token step
    first_token_at: float | None = None  # unix


class WorkerMetrics:
    def __init__(self, model: str, worker_id: str,
                 registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.worker_id = worker_id
        self.registry = registry or CollectorRegistry()
        self._timers: dict[str, _Timer] = {}
        self._sample = Sample()
        self._lock = threading.Lock()
        self.startup: StartupClock | None = None  # the worker's cold-start clock, if any
        self._define(self.registry)

    def _define(self, r: CollectorRegistry) -> None:
        m = ["model_name"]
        ProcessCollector(registry=r)  # process_start_time_seconds, CPU, memory
        self.info = Gauge(f"{PREFIX}worker_info", "Always 1; labels say what this worker runs",
                          ["model_name", "worker_id", "dtype", "quantization"], registry=r)
        self.state = Gauge(f"{PREFIX}worker_state", "1 for the worker's current state",
                           ["model_name", "state"], registry=r)
        self.start_time = Gauge(f"{PREFIX}worker_start_time_seconds",
                                "Unix time the worker process started (10 ms)", m, registry=r)
        self.startup_seconds = Gauge(f"{PREFIX}worker_startup_seconds",
                             "Seconds each start-up stage took", ["model_name", "stage"],
                             registry=r)
        self.running = Gauge(f"{PREFIX}num_requests_running", "Requests in the running batch",
                             m, registry=r)
        self.waiting = Gauge(f"{PREFIX}num_requests_waiting",
                             "Requests taken from the queue, waiting in this worker", m,
                             registry=r)
        self.kv_usage = Gauge(f"{PREFIX}kv_cache_usage_perc",
                              "KV-cache tokens in use over the budget (1 = full)", m, registry=r)
        self.kv_used = Gauge(f"{PREFIX}kv_cache_used_tokens", "KV-cache tokens in use", m,
                             registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens admitted", m,
                                     registry=r)
        self.prefix_queries = Counter(f"{PREFIX}prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache", m,
                                      registry=r)
        self.prefix_hits = Counter(f"{PREFIX}prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache (not prefilled)", m,
                                   registry=r)
        self.prefix_requests = Counter(f"{PREFIX}prefix_cache_requests",
                                       "Prefix-cache lookups by outcome (hit: any cached "
                                       "prefix reused)", ["model_name", "outcome"], registry=r)
        self.prefix_cached = Gauge(f"{PREFIX}prefix_cache_tokens",
                                   "Prompt tokens the prefix cache holds now", m, registry=r)
        self.gen_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated", m,
                                  registry=r)
        self.finished = Counter(f"{PREFIX}request_success",
                                "Requests finished, by finish reason",
                                ["model_name", "finished_reason"], registry=r)
        self.reclaimed = Counter(f"{PREFIX}requests_reclaimed",
                                 "Stalled requests this worker claimed from others", m,
                                 registry=r)
        self.dead_lettered = Counter(f"{PREFIX}requests_dead_lettered",
                                     "Entries this worker moved to the dead-letter stream", m,
                                     registry=r)
        self.compiled = Gauge(f"{PREFIX}compiled_decode_step",
                              "1 for the compiled decode step's state (active: attached; "
                              "warming: decode runs eager while it compiles)",
                              ["model_name", "state"], registry=r)
        self.steps = Counter(f"{PREFIX}engine_steps", "Engine steps run", m, registry=r)
        self.spec_proposed = Counter(f"{PREFIX}spec_decode_num_draft_tokens",
                                     "Speculative decoding: proposed tokens verified", m,
                                     registry=r)
        self.spec_accepted = Counter(f"{PREFIX}spec_decode_num_accepted_tokens",
                                     "Speculative decoding: proposed tokens accepted", m,
                                     registry=r)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds",
                              "From acceptance at the gateway to the first token", m,
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds",
                             "Between a request's consecutive tokens", m,
                             buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds",
                             "From acceptance at the gateway to the last token", m,
                             buckets=REQUEST_LATENCY_BUCKETS_S, registry=r)
        self.queue_time = Histogram(f"{PREFIX}request_queue_time_seconds",
                                    "From acceptance at the gateway to admission here", m,
                                    buckets=REQUEST_LATENCY_BUCKETS_S, registry=r)
        self.request_prompt = Histogram(f"{PREFIX}request_prompt_tokens",
                                        "Prompt tokens per request", m,
                                        buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.request_gen = Histogram(f"{PREFIX}request_generation_tokens",
                                     "Generated tokens per finished request", m,
                                     buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}batch_size_requests",
                                    "Requests that got a token in one engine step", m,
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.step_time = Histogram(f"{PREFIX}engine_step_duration_seconds",
                                   "Wall time of one engine step", m,
                                   buckets=STEP_DURATION_BUCKETS_S, registry=r)
        for reason in FINISH_REASONS:  # every series exists from the start (0, not absent)
            self.finished.labels(self.model, reason)
        for counter in (self.prompt_tokens, self.gen_tokens, self.reclaimed,
                        self.dead_lettered, self.steps, self.prefix_queries, self.prefix_hits,
                        self.spec_proposed, self.spec_accepted):
            counter.labels(self.model)
        for outcome in ("hit", "miss"):
            self.prefix_requests.labels(self.model, outcome)
        self._seen = EngineStats()  # the engine's cumulative counts at the last step

    # --- what the queue loop reports ----------------------------------------------------

    def describe(self, dtype: str, quantization: str) -> None:
        self.info.labels(self.model, self.worker_id, dtype or "none", quantization).set(1)

    def watch_state(self, state_of: Callable[[], str], states: Iterable[str]) -> None:
        """The state gauge reads ``state_of()`` at each scrape (1 for the current state)."""
        for name in states:
            self.state.labels(self.model, name).set_function(
                lambda name=name: 1.0 if state_of() == name else 0.0)

    def on_startup_stage(self, stage: str, seconds: float) -> None:
        self.startup_seconds.labels(self.model, stage).set(seconds)

    def start_clock(self) -> StartupClock:
        """The cold-start clock, from the process's start; its first mark is ``imports``."""
        self.startup = StartupClock(self.on_startup_stage)
        self.start_time.labels(self.model).set(self.startup.started_at)
        self.startup.mark(STAGES[0])
        return self.startup

    def on_serving(self) -> None:
        """The loop is set up and reads the queue: the cold start's last stage."""
        if self.startup is not None and STAGES[-1] not in self.startup.stages:
            self.startup.mark(STAGES[-1])

    def on_admitted(self, request_id: str, *, created_at: float, lane: str,
                    num_prompt_tokens: int) -> None:
        now = time.time()
        self._timers[request_id] = _Timer(created_at=created_at, admitted_at=now, lane=lane,
                                          num_prompt_tokens=num_prompt_tokens)
        self.prompt_tokens.labels(self.model).inc(num_prompt_tokens)
        self.request_prompt.labels(self.model).observe(num_prompt_tokens)
        if created_at > 0:
            self.queue_time.labels(self.model).observe(max(0.0, now - created_at))
        with self._lock:
            self._sample.prompt_tokens += num_prompt_tokens

    def on_admitted_request(self, request: GenerateRequest) -> None:
        self.on_admitted(request.id, created_at=request.created_at, lane=request.lane,
                         num_prompt_tokens=len(request.prompt_token_ids))

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats,
                duration_s: float) -> None:
        mono, now = time.monotonic(), time.time()
        num_tokens = 0
        num_rows = 0
        ttfts: list[float] = []
        for out in outputs:
            count = len(out.new_token_ids)
            if not count:
                continue
            num_rows += 1
            num_tokens += count
            timer = self._timers.get(out.id)
            if timer is None:
                continue
            if timer.last_token_at is None:
                timer.first_token_at = now
                if timer.created_at > 0:
                    ttfts.append(max(0.0, now - timer.created_at))
            else:
                gap = (mono - timer.last_token_at) / count
                for _ in range(count):
                    self.itl.labels(self.model).observe(gap)
            timer.last_token_at = mono
        self.steps.labels(self.model).inc()
        self.step_time.labels(self.model).observe(duration_s)
        if num_rows:
            self.batch_size.labels(self.model).observe(num_rows)
            self.gen_tokens.labels(self.model).inc(num_tokens)
        for seconds in ttfts:
            self.ttft.labels(self.model).observe(seconds)
        self.on_engine_stats(stats)
        with self._lock:
            self._sample.gen_tokens += num_tokens
            for seconds in ttfts:
                self._sample.add_ttft(seconds)

    def on_engine_stats(self, stats: EngineStats) -> None:
        self.running.labels(self.model).set(stats.num_running)
        self.waiting.labels(self.model).set(stats.num_waiting)
        self.kv_used.labels(self.model).set(stats.kv_tokens_used)
        usage = stats.kv_tokens_used / stats.kv_tokens_budget if stats.kv_tokens_budget else 0.0
        self.kv_usage.labels(self.model).set(usage)
        for state in COMPILE_STATES:
            self.compiled.labels(self.model, state).set(1.0 if stats.compiled == state else 0.0)
        self._on_cumulative_stats(stats)

    def _on_cumulative_stats(self, stats: EngineStats) -> None:
        """The engine counts since it started; the counters take the increase."""
        seen = self._seen
        for counter, now, before in (
                (self.prefix_queries.labels(self.model), stats.prefix_cache_query_tokens,
                 seen.prefix_cache_query_tokens),
                (self.prefix_hits.labels(self.model), stats.prefix_cache_hit_tokens,
                 seen.prefix_cache_hit_tokens),
                (self.prefix_requests.labels(self.model, "hit"), stats.prefix_cache_hits,
                 seen.prefix_cache_hits),
                (self.prefix_requests.labels(self.model, "miss"), stats.prefix_cache_misses,
                 seen.prefix_cache_misses),
                (self.spec_proposed.labels(self.model), stats.spec_proposed, seen.spec_proposed),
                (self.spec_accepted.labels(self.model), stats.spec_accepted, seen.spec_accepted)):
            if now > before:
                counter.inc(now - before)
        self.prefix_cached.labels(self.model).set(stats.prefix_cache_tokens)
        self._seen = stats

    def on_finished(self, request_id: str, finish_reason: str, *, num_output_tokens: int,
                    num_prompt_tokens: int, lane: str = "") -> None:
        """Every request this worker ends, through the engine or not (cancelled or timed out
        in the queue, dead-lettered)."""
        now = time.time()
        reason = finish_reason if finish_reason in FINISH_REASONS else "error"
        self.finished.labels(self.model, reason).inc()
        timer = self._timers.pop(request_id, None)
        summary = JobSummary(id=request_id, model=self.model, lane=lane, worker=self.worker_id,
                             finish_reason=reason, prompt_tokens=num_prompt_tokens,
                             completion_tokens=num_output_tokens, finished_at=now)
        if timer is not None:
            summary.lane = timer.lane
            self.request_gen.labels(self.model).observe(num_output_tokens)
            if timer.created_at > 0:
                summary.total_s = max(0.0, now - timer.created_at)
                summary.queue_s = max(0.0, timer.admitted_at - timer.created_at)
                self.e2e.labels(self.model).observe(summary.total_s)
                if timer.first_token_at is not None:
                    summary.ttft_s = max(0.0, timer.first_token_at - timer.created_at)
        with self._lock:
            self._sample.finished += 1
            self._sample.jobs.append(summary)

    def on_reclaimed(self, count: int) -> None:
        if count:
            self.reclaimed.labels(self.model).inc(count)

    def on_dead_lettered(self, count: int = 1) -> None:
        if count:
            self.dead_lettered.labels(self.model).inc(count)

    def forget(self, request_id: str) -> None:
        """Drop a request's timer without counting it finished (handed back on exit)."""
        self._timers.pop(request_id, None)

    # --- readers ------------------------------------------------------------------------

    def take_sample(self) -> Sample:
        """What happened since the last call (for ``shared.telemetry.queue_sample``)."""
        with self._lock:
            sample, self._sample = self._sample, Sample()
        return sample
