"""The one process supervisor: ``tokenfleet up``, the bench's ``LocalFleet`` and the tests'
``Fleet`` all start, watch and stop their processes with it.

- Children run in their own session (Ctrl-C reaches only the supervisor) and get SIGTERM
  if the supervisor dies without cleaning up (Linux ``PR_SET_PDEATHSIG``).
- App processes are ``python -m tokenfleet <role>`` with this interpreter.
- Waits are on state (a PING answered, ``/readyz`` counting workers), and stop early with the
  child's log when a child exits while we wait.
- Stop is ordered: app processes first (SIGTERM, up to their drain timeout, then SIGKILL),
  Redis last.

No torch, no FastAPI, nothing from ``gateway`` or ``worker``.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shared.errors import TokenfleetError

logger = logging.getLogger("tokenfleet.supervisor")

POLL_INTERVAL_S = 0.1
REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 2000


class FleetError(TokenfleetError):
    """The fleet cannot start or run: no Redis, a port in use, a child that exited early."""


def role_argv(*args: str) -> list[str]:
    """``tokenfleet ARGS`` as a child process: this interpreter, no entry point needed."""
    return [sys.executable, "-m", "tokenfleet", *args]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS hands out as free now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --- processes --------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies without cleaning up (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None,
          **kwargs: object) -> subprocess.Popen[bytes]:
    """Start a child in its own session that dies with its parent.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the
    process: a child started from a short-lived thread (an autoscaler tick, a fault
    injector) would be killed as soon as that thread ends. So only children started from
    the main thread get it; the others are stopped by whoever started them."""
    is_main = threading.current_thread() is threading.main_thread()
    preexec = _die_with_parent if sys.platform.startswith("linux") and is_main else None
    return subprocess.Popen(  # type: ignore[call-overload]
        list(argv), env=dict(env) if env is not None else None, start_new_session=True,
        preexec_fn=preexec, **kwargs,
    )


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM every live process, wait up to ``timeout_s`` in all, then SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("pid %d did not stop in %.0f s; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()


# --- readiness probes -------------------------------------------------------------------


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    """True if a Redis (or Valkey) on ``host:port`` answers PING now."""
    try:
        with socket.create_connection((host, port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def http_answers(url: str) -> bool:
    """True once anything answers HTTP at ``url`` (any status: the server is up)."""
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def ready_workers(base_url: str) -> int:
    """How many workers the gateway at ``base_url`` counts in ``/readyz`` (0 if none/down)."""
    try:
        with urllib.request.urlopen(f"{base_url}/readyz", timeout=2.0) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 while no worker is ready: still a count
        try:
            body = json.loads(exc.read())
        except ValueError:
            return 0
    except (OSError, ValueError):
        return 0
    workers = body.get("workers", 0) if isinstance(body, dict) else 0
    return workers if isinstance(workers, int) else 0


# --- redis ------------------------------------------------------------------------------


class RedisProcess:
    """A private redis-server (or valkey-server) on 127.0.0.1; ``restart()`` keeps its data.

    ``aof`` turns on append-only persistence in ``data_dir`` (what ``tokenfleet up`` and the
    fault tests need); without it nothing is written to disk (the bench).
    """

    def __init__(self, binary: Path, data_dir: Path, port: int | None = None, *,
                 aof: bool = True) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = port or free_port()
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def argv(self) -> list[str]:
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof
                       else ["--appendonly", "no"])
        return [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", *persistence, "--dir", str(self.data_dir),
                "--logfile", str(self.log_path), "--protected-mode", "no"]

    def start(self, timeout_s: float = REDIS_START_TIMEOUT_S) -> None:
        """Start it and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if redis_answers(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise FleetError(f"{self.binary.name} did not start on port {self.port}; "
                              f"see {self.log_path}")

    def stop(self, timeout_s: float = REDIS_STOP_TIMEOUT_S) -> None:
        """SIGTERM (Redis flushes its AOF and exits), SIGKILL after ``timeout_s``."""
        if self.proc is not None:
            stop_processes([self.proc], timeout_s)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


# --- the supervisor ---------------------------------------------------------------------


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None = None

    def log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""


class Supervisor:
    """Children of one fleet, and its Redis if the fleet owns one.

    ``env`` is every child's environment (``extra_env`` adds to it per child); with
    ``log_dir`` each child writes stdout and stderr to ``<log_dir>/<name>.log``, otherwise
    it shares the supervisor's terminal.
    """

    def __init__(self, env: Mapping[str, str], *, log_dir: Path | None = None,
                 cwd: Path | None = None, stop_timeout_s: float = 30.0,
                 redis: RedisProcess | None = None) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.cwd = cwd
        self.stop_timeout_s = stop_timeout_s
        self.redis = redis
        self.children: list[Child] = []
        self.stop_requested = False

    # --- start ---------------------------------------------------------------------------
    def start(self, name: str, argv: Sequence[str],
              extra_env: Mapping[str, str] | None = None) -> Child:
        env = {**self.env, **(extra_env or {})}
        log_path = self.log_dir / f"{name}.log" if self.log_dir is not None else None
        log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        try:
            proc = spawn(argv, env, cwd=self.cwd, stdout=log,
                         stderr=subprocess.STDOUT if log else None)
        finally:
            if log is not None:
                log.close()  # the child holds its own copy
        child = Child(name, proc, log_path)
        self.children.append(child)
        logger.info("started %s (pid %d)", name, proc.pid)
        return child

    def start_role(self, name: str, *args: str,
                   extra_env: Mapping[str, str] | None = None) -> Child:
        """``python -m tokenfleet ARGS`` (``gateway``, ``worker``, ...) as child ``name``."""
        return self.start(name, role_argv(*args), extra_env)

    # --- watch ---------------------------------------------------------------------------
    def first_dead(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float, what: str,
                   watch: Sequence[Child] | None = None) -> None:
        """Poll ``predicate`` until true; raise if a watched child exits first or on timeout.

        ``watch`` defaults to every child; pass the ones that must stay alive while waiting.
        """
        watched = self.children if watch is None else watch
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate():
                return
            dead = next((c for c in watched if c.proc.poll() is not None), None)
            if dead is not None:
                raise FleetError(f"{dead.name} exited with code {dead.proc.returncode} "
                                      f"while waiting for {what}:\n{dead.log_tail()}")
            if time.monotonic() >= deadline:
                raise FleetError(f"{what}: not reached in {timeout_s:.0f} s"
                                      + (f"; logs in {self.log_dir}" if self.log_dir else ""))
            time.sleep(POLL_INTERVAL_S)

    def wait_ready(self, base_url: str, num_workers: int, timeout_s: float,
                   watch: Sequence[Child] | None = None) -> None:
        """Until the gateway at ``base_url`` counts ``num_workers`` ready workers."""
        self.wait_until(lambda: ready_workers(base_url) >= num_workers, timeout_s,
                        f"{num_workers} ready worker(s) at {base_url}", watch)

    def request_stop(self, signum: int, _frame: object = None) -> None:
        """Signal handler: the first signal stops gracefully, a second one kills."""
        if self.stop_requested:
            logger.warning("second %s: killing the fleet now", signal.Signals(signum).name)
            for child in self.children:
                if child.proc.poll() is None:
                    child.proc.kill()
            return
        logger.info("got %s; stopping the fleet (again to kill)", signal.Signals(signum).name)
        self.stop_requested = True

    def supervise(self, on_tick: Callable[[], None] = lambda: None,
                  interval_s: float = 0.5) -> int:
        """Until a stop is requested (-> 0) or a child exits on its own (-> 1)."""
        while not self.stop_requested:
            dead = self.first_dead()
            if dead is not None:
                logger.error("%s exited unexpectedly with code %s; stopping the fleet",
                             dead.name, dead.proc.returncode)
                return 1
            on_tick()
            time.sleep(interval_s)
        return 0

    # --- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """App processes first (SIGTERM, drain, SIGKILL after ``stop_timeout_s``), Redis last."""
        stop_processes([c.proc for c in self.children], self.stop_timeout_s)
        if self.redis is not None:
            self.redis.stop()
        logger.info("fleet stopped")
