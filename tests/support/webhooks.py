"""A webhook receiver on 127.0.0.1 for tests: the project's example receiver
(``examples/webhook_receiver.py``: signature check, dedupe by ``webhook-id``) behind a door
that answers 500 to the first ``fail_first`` attempts of every event (or to all of them)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "webhook_receiver.py"


def example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Delivery:
    webhook_id: str
    timestamp: str
    status: int
    at: float


@dataclass
class Receiving:
    """What arrived: every attempt, and each event the example receiver accepted."""

    secret: str
    fail_first: int = 0  # attempts of each event answered 500 before it is let through
    fail_always: bool = False
    attempts: list[Delivery] = field(default_factory=list)
    accepted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (event, job)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted_ids(self, event: str = "completed") -> list[str]:
        with self._lock:
            return [job["id"] for name, job in self.accepted if name == event]

    def attempts_of(self, webhook_id: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.attempts if d.webhook_id == webhook_id]

    def wait_for(self, job_ids: set[str], timeout_s: float, event: str = "completed") -> None:
        deadline = time.monotonic() + timeout_s
        while not job_ids <= set(self.accepted_ids(event)):
            missing = job_ids - set(self.accepted_ids(event))
            assert time.monotonic() < deadline, f"{len(missing)} {event} events never arrived"
            time.sleep(0.02)

    async def until(self, job_ids: set[str], timeout_s: float = 20.0,
                    event: str = "completed") -> None:
        deadline = time.monotonic() + timeout_s
        while not job_ids <= set(self.accepted_ids(event)):
            missing = job_ids - set(self.accepted_ids(event))
            assert time.monotonic() < deadline, f"{len(missing)} {event} events never arrived"
            await asyncio.sleep(0.01)

    async def until_attempts(self, count: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.attempts) < count:
            assert time.monotonic() < deadline, f"only {len(self.attempts)} attempts arrived"
            await asyncio.sleep(0.01)


@contextlib.contextmanager
def receiving(secret: str, *, fail_first: int = 0,
              fail_always: bool = False) -> Iterator[Receiving]:
    example = example_module()
    state = Receiving(secret=secret, fail_first=fail_first, fail_always=fail_always)

    def on_job(event: str, job: dict[str, Any]) -> None:
        with state._lock:
            state.accepted.append((event, job))

    receiver = example.Receiver(secret, on_job)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            webhook_id = self.headers.get("webhook-id", "")
            with state._lock:
                earlier = sum(1 for d in state.attempts if d.webhook_id == webhook_id)
            if state.fail_always or earlier < state.fail_first:
                status = 500
            else:
                status = receiver.handle(body, dict(self.headers.items()))
            with state._lock:
                state.attempts.append(Delivery(webhook_id, self.headers.get(
                    "webhook-timestamp", ""), status, time.monotonic()))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/tokenfleet"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
