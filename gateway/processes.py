"""``run_processes(settings, n)``: N gateway processes on one port (``tokenfleet gateway
--workers N``), so one host's gateway uses all its cores.

Each process is a whole gateway (``gateway.server.serve``): its own event loop, Redis
pool, gateway id and pub/sub channel (``Keys.gateway_channel``), so a worker publishes a
request's tokens to the process that holds its stream. Each binds the port itself with
``SO_REUSEPORT`` and the kernel spreads new connections over the processes by their
address hash. (A listening socket shared by every process would let one event loop accept
a whole burst of connections alone: libuv and asyncio accept until the queue is empty.)

The parent serves nothing. It holds the port (bound with ``SO_REUSEPORT``, never
listening, so it takes no connection), starts the processes, forwards SIGTERM and SIGINT
to them (each drains as a single gateway does: a second signal skips the delay), and
replaces a process that dies after it was ready. A process that dies before it was ready
(bad settings, a port it cannot bind) stops the whole gateway with exit code 1.
Linux only: elsewhere ``SO_REUSEPORT`` does not spread connections.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.synchronize import Event
from types import FrameType

from shared.errors import TokenfleetError
from shared.settings import Settings

logger = logging.getLogger("tokenfleet.gateway")

POLL_S = 0.5  # how often the parent looks at its processes when none exits


def can_share_port() -> bool:
    """True where several processes can listen on one port with kernel balancing."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (not yet listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:
    """In a process: get SIGTERM when the parent dies without stopping it (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _serve_one(settings: Settings, index: int, ready: Event) -> None:
    """The body of gateway process ``index``: one gateway on its own ``SO_REUSEPORT``
    socket; ``ready`` is set once it serves."""
    from gateway.server import serve

    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above: do not linger
        return
    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only, which forwards it once
    sock = reuse_port_socket(settings.host, settings.port)
    serve(settings, sockets=[sock], on_started=ready.set,
          name=f"gateway process {index + 1}")


@dataclass(slots=True)
class _Process:
    index: int
    proc: SpawnProcess
    ready: Event


class ProcessGroup:
    """The gateway processes of one port, and what the parent does with them."""

    def __init__(self, settings: Settings, num_processes: int,
                 ctx: SpawnContext | None = None) -> None:
        self.settings = settings
        self.num_processes = num_processes
        self.ctx = ctx or multiprocessing.get_context("spawn")
        self.processes: list[_Process] = []
        self.is_stopping = False
        self.failed = False

    def start(self, index: int) -> _Process:
        ready = self.ctx.Event()
        proc = self.ctx.Process(target=_serve_one, args=(self.settings, index, ready),
                                name=f"tokenfleet-gateway-{index + 1}")
        proc.start()
        entry = _Process(index, proc, ready)
        self.processes.append(entry)
        logger.info("started gateway process %d (pid %d)", index + 1, proc.pid)
        return entry

    def start_all(self) -> None:
        for index in range(self.num_processes):
            self.start(index)

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: stop (drain) every process; a repeated signal is passed on too."""
        self.is_stopping = True
        for entry in self.processes:
            if entry.proc.pid is not None and entry.proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry.proc.pid, signum)

    def check(self) -> None:
        """Handle processes that exited: replace one that was serving, or stop the group
        when one never got ready."""
        for entry in [e for e in self.processes if e.proc.exitcode is not None]:
            self.processes.remove(entry)
            entry.proc.join()
            if self.is_stopping:
                continue
            code = entry.proc.exitcode
            if not entry.ready.is_set():
                logger.error("gateway process %d exited with code %s before it was ready; "
                             "stopping the gateway", entry.index + 1, code)
                self.failed = True
                self.forward(signal.SIGTERM)
                continue
            logger.error("gateway process %d exited with code %s; starting a new one",
                         entry.index + 1, code)
            self.start(entry.index)

    def wait(self, timeout_s: float) -> None:
        sentinels = [e.proc.sentinel for e in self.processes]
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout_s)

    def supervise(self) -> int:
        """Until every process has exited after a stop: 0 when all drained cleanly."""
        while self.processes:
            self.wait(POLL_S)
            codes = [e.proc.exitcode for e in self.processes if e.proc.exitcode is not None]
            if self.is_stopping and any(code != 0 for code in codes):
                self.failed = True
            self.check()
        return 1 if self.failed else 0


def run_processes(settings: Settings, num_processes: int) -> int:
    """Serve ``settings.port`` with ``num_processes`` gateway processes until stopped."""
    if not can_share_port():
        raise TokenfleetError("several gateway processes on one port need Linux "
                              "(SO_REUSEPORT); run one gateway per port behind a balancer")
    try:
        holder = reuse_port_socket(settings.host, settings.port)
    except OSError as exc:
        raise TokenfleetError(f"cannot bind {settings.host}:{settings.port}: {exc}") from exc
    with holder:
        port = int(holder.getsockname()[1])  # a fixed port when settings.port is 0
        group = ProcessGroup(settings.model_copy(update={"port": port}), num_processes)
        previous = {sig: signal.signal(sig, group.forward)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            group.start_all()
            logger.info("gateway: %d processes on http://%s:%d", num_processes,
                        settings.host, port)
            return group.supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
