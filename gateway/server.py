"""``run(settings)``: serve the gateway with uvicorn (what ``tokenfleet gateway`` calls)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from shared.settings import Settings


class _Server(uvicorn.Server):
    """Marks the gateway as shutting down as soon as a signal arrives (``/readyz`` -> 503)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's handlers, without re-raising the signal after a graceful shutdown: a
        drained gateway exits 0, like a drained worker."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        gateway = getattr(self._app.state, "gateway", None)
        if gateway is not None:
            gateway.is_shutting_down = True
        super().handle_exit(sig, frame)


def run(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.upper() == "DEBUG",
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        lifespan="on",
    )
    _Server(config, app).run()
