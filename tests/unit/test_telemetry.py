"""shared.telemetry (dashboard history), shared.queue_depth, and the worker's metrics object,
against a real Redis where Redis is involved."""

from __future__ import annotations

import time

import pytest
import redis

from shared.keys import LANES, WORKER_GROUP, Keys
from shared.protocol import SamplingParams
from shared.queue_depth import parse_depths, queue_commands
from shared.telemetry import (
    BUCKET_S,
    TTFT_BUCKETS_S,
    JobSummary,
    Sample,
    bucket_of,
    histogram_quantile,
    merge,
    parse_window,
    queue_sample,
    queue_window_read,
    ttft_bucket_index,
    window_buckets,
)
from worker.engine.types import EngineRequest
from worker.metrics import WorkerMetrics
from worker.null_engine import NullEngine

KEYS = Keys("tfunit")


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def counts_with(index_counts: dict[int, int]) -> list[int]:
    counts = [0] * (len(TTFT_BUCKETS_S) + 1)
    for index, count in index_counts.items():
        counts[index] = count
    return counts


def test_quantile_interpolates_inside_the_bucket() -> None:
    index = TTFT_BUCKETS_S.index(0.25)  # bucket (0.1, 0.25]
    counts = counts_with({index: 10})
    assert histogram_quantile(0.5, counts) == pytest.approx(0.1 + 0.15 * 0.5)
    assert histogram_quantile(0.99, counts) == pytest.approx(0.1 + 0.15 * 0.99)


def test_quantile_of_two_buckets_and_of_nothing() -> None:
    low, high = TTFT_BUCKETS_S.index(0.01), TTFT_BUCKETS_S.index(1.0)
    counts = counts_with({low: 99, high: 1})
    assert histogram_quantile(0.5, counts) <= 0.01
    assert 0.75 < histogram_quantile(0.999, counts) <= 1.0
    assert histogram_quantile(0.5, counts_with({})) is None
    assert histogram_quantile(0.5, counts_with({len(TTFT_BUCKETS_S): 3})) == TTFT_BUCKETS_S[-1]


def test_bucket_index_matches_prometheus_le() -> None:
    assert ttft_bucket_index(0.0) == 0
    assert ttft_bucket_index(TTFT_BUCKETS_S[3]) == 3  # upper bounds are inclusive
    assert ttft_bucket_index(TTFT_BUCKETS_S[3] + 1e-9) == 4
    assert ttft_bucket_index(1e9) == len(TTFT_BUCKETS_S)


def test_samples_round_trip_through_redis(client: redis.Redis) -> None:
    now = (bucket_of(time.time()) + 0.5) * BUCKET_S  # mid-bucket
    for worker in range(3):
        sample = Sample(gen_tokens=100, prompt_tokens=10, finished=2)
        sample.add_ttft(0.2)
        sample.add_ttft(0.2 + worker)
        sample.jobs = [JobSummary(id=f"job-{worker}-{i}", model="m", lane="interactive",
                                  worker=f"w{worker}", finish_reason="stop") for i in range(2)]
        pipe = client.pipeline(transaction=False)
        queue_sample(pipe, KEYS, sample, now)
        pipe.execute()
    buckets = window_buckets(now + BUCKET_S)  # the sampled bucket is now complete
    assert buckets[-1] == bucket_of(now)
    pipe = client.pipeline(transaction=False)
    queue_window_read(pipe, KEYS, buckets)
    history, jobs = parse_window(buckets, pipe.execute())
    last = history[-1]
    assert (last.gen_tokens, last.prompt_tokens, last.finished) == (300, 30, 6)
    assert sum(last.ttft_counts) == 6
    assert last.point()["gen_tokens_per_s"] == 300 / BUCKET_S
    assert 0.1 < last.point()["ttft_p50_s"] <= 0.25
    assert [job.id for job in jobs][:2] == ["job-2-1", "job-2-0"]  # newest first
    assert len(jobs) == 6
    assert merge(history).finished == 6
    ttl = client.ttl(KEYS.fleet_series(bucket_of(now)))
    assert 0 < ttl <= 720


def test_queue_depth_is_lag_plus_pending(client: redis.Redis) -> None:
    model = "m"
    interactive, batch = (KEYS.requests_stream(model, lane) for lane in LANES)
    for _ in range(5):
        client.xadd(interactive, {"m": b"x"})
    client.xgroup_create(interactive, WORKER_GROUP, id="0")
    client.xreadgroup(WORKER_GROUP, "c1", {interactive: ">"}, count=2)
    for _ in range(3):
        client.xadd(batch, {"m": b"x"})  # no group yet: every entry is lag
    pipe = client.pipeline(transaction=False)
    queue_commands(pipe, KEYS, model)
    depths = parse_depths(model, pipe.execute(raise_on_error=False))
    by_lane = {d.lane: (d.lag, d.pending, d.depth) for d in depths}
    assert by_lane == {"interactive": (3, 2, 5), "batch": (3, 0, 3)}
    pipe = client.pipeline(transaction=False)
    queue_commands(pipe, KEYS, "no-such-model")
    assert [d.depth for d in parse_depths("no-such-model",
                                          pipe.execute(raise_on_error=False))] == [0, 0]


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, {"model_name": "m", **labels})
    return 0.0 if found is None else found


def test_worker_metrics_count_what_the_engine_did() -> None:
    metrics = WorkerMetrics("m", "w1")
    engine = NullEngine(max_batch_size=8, num_tokens=4)
    created = time.time() - 0.5  # accepted half a second ago
    for i in range(3):
        request = EngineRequest(f"r{i}", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4))
        engine.add_request(request)
        metrics.on_admitted(request.id, created_at=created, lane="interactive",
                            num_prompt_tokens=5)
    while engine.has_unfinished():
        outputs = engine.step()
        metrics.on_step(outputs, engine.stats(), duration_s=0.001)
        for out in outputs:
            if out.finished:
                metrics.on_finished(out.id, out.finish_reason or "stop",
                                    num_output_tokens=out.num_output_tokens,
                                    num_prompt_tokens=out.num_prompt_tokens)
    metrics.on_finished("never-admitted", "cancelled", num_output_tokens=0,
                        num_prompt_tokens=7, lane="batch")
    assert value(metrics, "tokenfleet:prompt_tokens_total") == 15
    assert value(metrics, "tokenfleet:generation_tokens_total") == 12
    assert value(metrics, "tokenfleet:request_success_total", finished_reason="length") == 3
    assert value(metrics, "tokenfleet:request_success_total", finished_reason="cancelled") == 1
    assert value(metrics, "tokenfleet:time_to_first_token_seconds_count") == 3
    assert value(metrics, "tokenfleet:time_to_first_token_seconds_sum") >= 1.5
    assert value(metrics, "tokenfleet:inter_token_latency_seconds_count") == 9
    assert value(metrics, "tokenfleet:e2e_request_latency_seconds_count") == 3
    assert value(metrics, "tokenfleet:request_queue_time_seconds_count") == 3
    assert value(metrics, "tokenfleet:batch_size_requests_count") == 4  # 4 steps of 3 rows
    assert value(metrics, "tokenfleet:batch_size_requests_sum") == 12
    assert value(metrics, "tokenfleet:num_requests_running") == 0
    sample = metrics.take_sample()
    assert (sample.gen_tokens, sample.prompt_tokens, sample.finished) == (12, 15, 4)
    assert sum(sample.ttft_counts.values()) == 3
    timed = [job for job in sample.jobs if job.ttft_s is not None]
    assert len(timed) == 3 and all(job.ttft_s >= 0.5 and job.queue_s >= 0.5 for job in timed)
    assert sample.jobs[-1].lane == "batch" and sample.jobs[-1].total_s is None
    assert metrics.take_sample().is_empty
