"""SIGTERM on a real gateway process: readiness drops, new work is refused, open streams
finish, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from tests.conftest import free_port
from tests.integration.fleet import REPO
from tests.support.gateway import parse_sse
from tests.support.model import tiny_model_info
from tests.support.worker import running_worker
from tokenfleet.supervisor import role_argv, spawn

PREFIX = "tfdrain"
NUM_WORDS = 60  # the scripted worker's SLOW mode: 50 ms a token -> about 3 s a stream
SHUTDOWN_DELAY_S = 1.5


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = dict(os.environ, TOKENFLEET_REDIS_URL=redis_url, TOKENFLEET_KEY_PREFIX=PREFIX,
               TOKENFLEET_PORT=str(port), TOKENFLEET_GATEWAY_SHUTDOWN_DELAY_S=str(SHUTDOWN_DELAY_S),
               TOKENFLEET_GATEWAY_DRAIN_TIMEOUT_S="20", PYTHONUNBUFFERED="1")
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = spawn(role_argv("gateway"), env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def _wait_ready(http: httpx.AsyncClient, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the gateway exited early"
        try:
            if (await http.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never became ready")


async def _stream(http: httpx.AsyncClient, started: asyncio.Event) -> str:
    body = {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": NUM_WORDS,
            "stream": True}
    text = ""
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_text():
            text += chunk
            if '"content":"w"' in text:
                started.set()
    return text


async def test_sigterm_drains_open_streams_and_exits_0(
        redis_url: str, gateway: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, url = gateway
    worker = running_worker(Settings(redis_url=redis_url, key_prefix=PREFIX), tiny_model_info(),
                            reply=["w"] * NUM_WORDS)
    async with worker, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await _wait_ready(http, proc)
        started = asyncio.Event()
        streams = [asyncio.create_task(_stream(http, started)) for _ in range(2)]
        await asyncio.wait_for(started.wait(), timeout=10)

        proc.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:  # new connections
            ready = await fresh.get("/readyz")
            while ready.status_code == 200:  # until the gateway has handled the signal
                ready = await fresh.get("/readyz")
            signalled = time.monotonic()
            refused = await fresh.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        # Both answered (not refused): they came in during the shutdown delay.
        assert ready.status_code == 503 and "shutting down" in ready.json()["reason"]
        assert refused.status_code == 503
        assert "shutting down" in refused.json()["error"]["message"]

        for body in await asyncio.gather(*streams):
            events = parse_sse(body)
            assert events[-1] == (None, "[DONE]")
            chunks = [json.loads(data) for _, data in events[:-1]]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert text == "w" * NUM_WORDS
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert time.monotonic() - signalled > SHUTDOWN_DELAY_S  # outlived the delay
    assert await asyncio.to_thread(proc.wait, 30) == 0
