"""``run(settings)``: serve the gateway with uvicorn (what ``tokenfleet gateway`` calls);
with ``TOKENFLEET_GATEWAY_WORKERS`` > 1, that many gateway processes on one port
(``gateway.processes``), each drained as below.

On SIGTERM (or Ctrl-C) the gateway drains in two steps:

1. At once it refuses new generation requests (503 "shutting down") and ``/readyz``
   answers 503, but keeps its port open for ``TOKENFLEET_GATEWAY_SHUTDOWN_DELAY_S`` so a
   load balancer sees it leave instead of getting refused connections.
2. Then uvicorn's graceful shutdown: no new connections; open requests and streams get up
   to ``TOKENFLEET_GATEWAY_DRAIN_TIMEOUT_S`` to finish before they are cancelled.

A second signal skips the delay; a third Ctrl-C forces the exit. A drained gateway exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from shared.settings import Settings

logger = logging.getLogger("tokenfleet.gateway")


class _Server(uvicorn.Server):
    """uvicorn, with the gateway marked as shutting down as soon as a signal arrives."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_delay_s: float,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_delay_s = shutdown_delay_s
        self._on_started = on_started
        self._exit_at: float | None = None  # time.monotonic() when step 2 starts
        self._announced = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit and self._on_started is not None:
            self._on_started()

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
        # A signal handler: set flags only (no logging, no awaiting).
        gateway = getattr(self._app.state, "gateway", None)
        if gateway is not None:
            gateway.is_shutting_down = True
        if self._exit_at is None and self._shutdown_delay_s > 0:
            self._exit_at = time.monotonic() + self._shutdown_delay_s
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and not self._announced:
            self._announced = True
            logger.info("shutting down: refusing new generation requests; /readyz answers 503 "
                        "for %.1f s, then open streams get up to %s s to finish",
                        self._shutdown_delay_s, self.config.timeout_graceful_shutdown)
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)


def run(settings: Settings) -> int:
    """Serve until stopped; the exit code (0: drained cleanly)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.gateway_workers > 1:
        from gateway.processes import run_processes

        return run_processes(settings, settings.gateway_workers)
    serve(settings)
    return 0


def serve(settings: Settings, sockets: list[socket.socket] | None = None,
          on_started: Callable[[], None] | None = None, name: str = "gateway") -> None:
    """One gateway process: uvicorn binds ``settings.host:port``, or serves ``sockets``.
    ``on_started`` runs once it accepts connections."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [{name}]: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.upper() == "DEBUG",
        timeout_graceful_shutdown=math.ceil(settings.gateway_drain_timeout_s),
        lifespan="on",
    )
    _Server(config, app, settings.gateway_shutdown_delay_s, on_started).run(sockets)
