"""Issue 2 end to end: real redis-server, gateway and two SmolLM2 workers as processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.integration.fleet import Fleet, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("fleet"), num_workers=2,
                       TOKENFLEET_MAX_BATCH_SIZE="16") as fleet:
        yield fleet


@pytest.fixture
def client(fleet: Fleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=60) as c:
        yield c


def _redis(fleet: Fleet) -> redis.Redis:
    return redis.Redis.from_url(fleet.redis.url)


def _entries_added(fleet: Fleet) -> int:
    """How many entries were ever added to the request streams.

    Not ``XLEN``: the worker's tidy pass trims entries every consumer is done with, so
    the length can drop between two reads; ``entries-added`` only grows.
    """
    keys = Keys("tfe2e")
    r = _redis(fleet)
    added = 0
    for lane in ("interactive", "batch"):
        stream = keys.requests_stream(MODEL, lane)
        if r.exists(stream):
            added += int(r.xinfo_stream(stream)["entries-added"])
    return added


def test_chat_completion_answers_paris(client: httpx.Client) -> None:
    resp = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": FRANCE, "max_tokens": 30, "temperature": 0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_chat_completion_streams_sse_events_then_done(client: httpx.Client) -> None:
    events: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": FRANCE, "max_tokens": 30, "temperature": 0,
            "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "Paris" in text
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) >= 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_endpoint_and_length_finish(client: httpx.Client) -> None:
    resp = client.post("/v1/completions", json={
        "model": MODEL, "prompt": "The first three planets are", "max_tokens": 5,
        "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_job_polling_and_late_stream(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json={"model": MODEL, "messages": FRANCE, "max_tokens": 30,
                                         "temperature": 0})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert resp.headers["location"].endswith(f"/v1/jobs/{job_id}")
    job: dict[str, object] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running", "succeeded")
        if job["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded"
    assert "Paris" in str(job["text"])
    assert job["completion_tokens"] and job["prompt_tokens"]
    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as late:  # connects after the end
        data = [line[6:] for line in late.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    replayed = "".join((c["choices"][0].get("delta") or {}).get("content") or ""
                       for c in chunks if c.get("choices"))
    assert replayed == job["text"]


def test_two_workers_share_the_stream(client: httpx.Client, fleet: Fleet) -> None:
    ids = []
    for i in range(12):
        resp = client.post("/v1/jobs", json={"model": MODEL, "prompt": f"Count to {i}:",
                                             "max_tokens": 24, "ignore_eos": True})
        ids.append(resp.json()["id"])
    workers = set()
    deadline = time.monotonic() + 90
    r = _redis(fleet)
    for job_id in ids:
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "succeeded":
                break
            time.sleep(0.1)
        assert job["status"] == "succeeded"
        workers.add(r.hget(Keys("tfe2e").job(job_id), "worker"))
    assert len(workers) == 2, workers


@pytest.mark.parametrize("path,body,status", [
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 9000}, 400),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400),
])
def test_bad_input_is_a_4xx_with_a_message_and_enqueues_nothing(
        client: httpx.Client, fleet: Fleet, path: str, body: dict[str, object],
        status: int) -> None:
    before = _entries_added(fleet)
    resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    message = resp.json()["error"]["message"]
    assert message and "Traceback" not in message
    assert _entries_added(fleet) == before


def test_malformed_json_is_400(client: httpx.Client, fleet: Fleet) -> None:
    before = _entries_added(fleet)
    resp = client.post("/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert "JSON" in resp.json()["error"]["message"]
    assert _entries_added(fleet) == before


def test_health_ready_and_models(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] >= 2
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
