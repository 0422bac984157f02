"""``tokenfleet gateway --workers 2``: two gateway processes on one port, each with its own
id and event channel, both serving streamed and non-streamed requests from one null-engine
worker; SIGTERM drains both and the gateway exits 0."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.integration.fleet import make_fleet

pytestmark = pytest.mark.integration

MODEL = "null-model"
TOKENS = 5
PREFIX = "tfe2e"  # make_fleet's
MAX_REQUESTS = 40  # fresh connections until both processes have served one (2**-39 to fail)


def _chat(url: str, stream: bool) -> str:
    """One request on a new connection; checks the whole answer and returns its id."""
    body = {"model": MODEL, "max_tokens": TOKENS, "stream": stream,
            "messages": [{"role": "user", "content": "Hi"}]}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    if not stream:
        answer = resp.json()
        assert answer["usage"]["completion_tokens"] == TOKENS
        assert answer["choices"][0]["message"]["content"]
        return str(answer["id"])
    lines = [line for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([text for text in contents if text]) == TOKENS
    return str(chunks[0]["id"])


def test_two_gateway_processes_serve_one_port_each_on_its_own_channel(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, TOKENFLEET_ENGINE="null", TOKENFLEET_SERVED_MODEL_NAME=MODEL,
                       TOKENFLEET_NULL_ENGINE_TOKENS=str(TOKENS),
                       TOKENFLEET_GATEWAY_SHUTDOWN_DELAY_S="0")
    keys = Keys(PREFIX)
    client = redis.Redis.from_url(fleet.redis.url)
    channels_pattern = keys.gateway_channel("*")
    try:
        fleet.start_gateway(processes=2)
        fleet.start_worker()
        fleet.wait_ready()
        fleet.supervisor.wait_until(lambda: len(client.pubsub_channels(channels_pattern)) == 2,
                                    30, "two gateway event channels")
        channels = {c.decode() for c in client.pubsub_channels(channels_pattern)}
        served_by: set[str] = set()
        for n in range(MAX_REQUESTS):
            job_id = _chat(fleet.url, stream=n % 2 == 0)
            gateway_id = client.hget(keys.job(job_id), "gateway")
            assert gateway_id is not None
            served_by.add(gateway_id.decode())
            if len(served_by) == 2 and n >= 3:  # both kinds of request ran at least twice
                break
        assert {keys.gateway_channel(g) for g in served_by} == channels

        assert fleet.gateway is not None
        fleet.gateway.send_signal(signal.SIGTERM)
        assert fleet.gateway.wait(timeout=60) == 0
        assert client.pubsub_channels(channels_pattern) == []  # both processes left
    finally:
        fleet.stop()
        client.close()
