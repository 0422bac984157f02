"""Issue 9, metrics: a real fleet (redis-server, gateway, two null-engine workers with
``TOKENFLEET_METRICS_PORT``) serves a known set of requests; the gateway's ``/metrics``, each
worker's ``/metrics`` and ``GET /v1/fleet`` then count exactly what was sent."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.integration.fleet import Fleet, make_fleet
from tests.integration.waiting import wait_for

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"  # the null engine serves under the default name
TOKENS = 5  # the null engine emits this many per request: every request ends with "length"
NUM_COMPLETIONS = 4
NUM_CHATS = 2
NUM_REQUESTS = NUM_COMPLETIONS + NUM_CHATS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= set(sample_labels))


def over_workers(scrapes: list[Samples], name: str, **labels: str) -> float:
    return sum(total(samples, name, **labels) for samples in scrapes)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path_factory.mktemp("metrics"), TOKENFLEET_ENGINE="null",
                       TOKENFLEET_NULL_ENGINE_TOKENS=str(TOKENS))
    fleet.worker_ports = [free_port(), free_port()]  # type: ignore[attr-defined]
    try:
        fleet.start_gateway()
        for port in fleet.worker_ports:  # type: ignore[attr-defined]
            fleet.start_worker({"TOKENFLEET_METRICS_PORT": str(port)})
        fleet.wait_ready(num_workers=2)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def sent(fleet: Fleet) -> dict[str, int]:
    """Send the requests once; returns the usage the gateway reported."""
    prompt_tokens = 0
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        for i in range(NUM_COMPLETIONS):
            response = client.post("/v1/completions", json={
                "model": MODEL, "prompt": f"request number {i}", "max_tokens": 16})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["finish_reason"] == "length"
            prompt_tokens += response.json()["usage"]["prompt_tokens"]
        for i in range(NUM_CHATS):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}],
                    "max_tokens": 16, "stream": True,
                    "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                chunks = [json.loads(line[6:]) for line in response.iter_lines()
                          if line.startswith("data: {")]
            prompt_tokens += chunks[-1]["usage"]["prompt_tokens"]
    return {"prompt_tokens": prompt_tokens}


def worker_scrapes(fleet: Fleet) -> list[Samples]:
    return [scrape(f"http://127.0.0.1:{port}/metrics")
            for port in fleet.worker_ports]  # type: ignore[attr-defined]


def test_gateway_metrics_count_the_requests(fleet: Fleet, sent: dict[str, int]) -> None:
    samples = scrape(f"{fleet.url}/metrics")
    assert total(samples, "tokenfleet:gateway_requests_total", model_name=MODEL,
                 kind="completion", lane="interactive") == NUM_COMPLETIONS
    assert total(samples, "tokenfleet:gateway_requests_total", kind="chat") == NUM_CHATS
    assert total(samples, "tokenfleet:http_requests_total", route="/v1/completions",
                 method="POST", status="200") == NUM_COMPLETIONS
    assert total(samples, "tokenfleet:http_requests_total",
                 route="/v1/chat/completions", status="200") == NUM_CHATS
    assert total(samples, "tokenfleet:http_request_duration_seconds_count",
                 route="/v1/completions") == NUM_COMPLETIONS
    assert total(samples, "tokenfleet:requests_throttled_total") == 0
    assert total(samples, "tokenfleet:workers", model_name=MODEL, state="ready") == 2
    for lane in ("interactive", "batch"):
        assert total(samples, "tokenfleet:queue_depth_requests", model_name=MODEL,
                     lane=lane) == 0
    assert (("tokenfleet:queue_lag_requests", (("lane", "interactive"),
                                                ("model_name", MODEL)))) in samples
    assert total(samples, "tokenfleet:dead_letter_requests", model_name=MODEL) == 0
    assert total(samples, "tokenfleet:gateway_info") == 1


def test_worker_metrics_count_requests_and_tokens(fleet: Fleet, sent: dict[str, int]) -> None:
    scrapes = worker_scrapes(fleet)
    finished = over_workers(scrapes, "tokenfleet:request_success_total",
                            finished_reason="length")
    assert finished == NUM_REQUESTS
    assert over_workers(scrapes, "tokenfleet:request_success_total") == NUM_REQUESTS
    assert over_workers(scrapes, "tokenfleet:generation_tokens_total") == NUM_REQUESTS * TOKENS
    assert over_workers(scrapes, "tokenfleet:prompt_tokens_total") == sent["prompt_tokens"]
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert over_workers(scrapes, f"tokenfleet:{name}_count") == NUM_REQUESTS, name
        assert over_workers(scrapes, f"tokenfleet:{name}_bucket", le="+Inf") == NUM_REQUESTS
    assert over_workers(scrapes, "tokenfleet:inter_token_latency_seconds_count") == \
        NUM_REQUESTS * (TOKENS - 1)
    assert over_workers(scrapes, "tokenfleet:time_to_first_token_seconds_sum") > 0
    assert over_workers(scrapes, "tokenfleet:batch_size_requests_sum") == NUM_REQUESTS * TOKENS
    assert over_workers(scrapes, "tokenfleet:num_requests_running") == 0
    assert over_workers(scrapes, "tokenfleet:requests_dead_lettered_total") == 0
    for samples in scrapes:
        assert total(samples, "tokenfleet:worker_info", model_name=MODEL) == 1
        assert total(samples, "tokenfleet:worker_state", state="ready") == 1
        assert ("tokenfleet:kv_cache_usage_perc", (("model_name", MODEL),)) in samples


def test_worker_probes(fleet: Fleet) -> None:
    for port in fleet.worker_ports:  # type: ignore[attr-defined]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200 and ready.json()["state"] == "ready"


def test_fleet_endpoint_shows_workers_queues_and_recent_requests(
        fleet: Fleet, sent: dict[str, int]) -> None:
    def recent() -> list[dict[str, object]]:
        jobs = httpx.get(f"{fleet.url}/v1/fleet", timeout=10).json()["recent_jobs"]
        return jobs if len(jobs) >= NUM_REQUESTS else []

    wait_for(recent, timeout_s=15, interval_s=0.2)  # workers write every 2 s
    body = httpx.get(f"{fleet.url}/v1/fleet", timeout=10).json()
    assert len(body["workers"]) == 2
    assert {w["state"] for w in body["workers"]} == {"ready"}
    assert all(w["uptime_s"] > 0 for w in body["workers"])
    (model,) = body["models"]
    assert model["name"] == MODEL and model["workers"] == 2 and model["queue_depth"] == 0
    assert [lane["lane"] for lane in model["lanes"]] == ["interactive", "batch"]
    jobs = body["recent_jobs"]
    assert len(jobs) == NUM_REQUESTS
    assert all(job["finish_reason"] == "length" and job["completion_tokens"] == TOKENS
               for job in jobs)
    assert all(job["ttft_s"] is not None and job["total_s"] >= job["ttft_s"] for job in jobs)
    assert sum(job["prompt_tokens"] for job in jobs) == sent["prompt_tokens"]
    assert body["series"]["bucket_s"] == 5 and len(body["series"]["points"]) == 120
    assert body["batches"] == []
