"""The gateway's signal handling (no process): flag at once, stop accepting after the delay."""

from __future__ import annotations

import signal
import time
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi import FastAPI

from gateway.auth import bearer_token
from gateway.server import _Server
from shared.errors import AuthError


def _server(delay_s: float) -> tuple[_Server, SimpleNamespace]:
    app = FastAPI()
    gateway = SimpleNamespace(is_shutting_down=False)
    app.state.gateway = gateway
    return _Server(uvicorn.Config(app), app, shutdown_delay_s=delay_s), gateway


async def test_sigterm_marks_the_gateway_then_stops_after_the_delay() -> None:
    server, gateway = _server(delay_s=0.05)
    server.handle_exit(signal.SIGTERM, None)
    assert gateway.is_shutting_down and not server.should_exit
    assert not await server.on_tick(1)
    time.sleep(0.06)
    assert await server.on_tick(2)


async def test_a_second_signal_skips_the_delay() -> None:
    server, _ = _server(delay_s=60)
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit


def test_no_delay_stops_at_once() -> None:
    server, gateway = _server(delay_s=0)
    server.handle_exit(signal.SIGINT, None)
    assert gateway.is_shutting_down and server.should_exit


def test_bearer_tokens_are_parsed_strictly() -> None:
    assert bearer_token("Bearer tf-abc") == "tf-abc"
    assert bearer_token("  bearer   tf-abc  ") == "tf-abc"
    for bad in ("", "Bearer", "Bearer   ", "Basic tf-abc", "tf-abc"):
        with pytest.raises(AuthError):
            bearer_token(bad)
