"""The ``tokenfleet`` command: help texts, light imports, and the pieces of ``up``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import DEFAULT_MODEL, Settings
from tokenfleet import cli, supervisor, up

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
    result = subprocess.run([sys.executable, "-m", "tokenfleet", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gateway" in result.stdout and "worker" in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["up", "--help"], ["bench", "--help"],
                                  ["keys", "list", "--help"]], ids=" ".join)
def test_help_imports_neither_torch_nor_fastapi(argv: list[str]) -> None:
    code = (
        "import sys, tokenfleet.cli\n"
        "try:\n"
        f"    tokenfleet.cli.main({argv!r})\n"
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
        "import sys, tokenfleet.cli\n"
        "rc = tokenfleet.cli.main(['model', 'path'])\n"
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
    off = up.auth_mode(Settings())
    assert off.startswith("off (local use") and "TOKENFLEET_AUTH=true" in off
    on = up.auth_mode(Settings(auth=True, api_keys=["a", "b"], rate_limit_rpm=60))
    assert on.startswith("ON") and "2 static keys from TOKENFLEET_API_KEYS" in on
    assert "tokenfleet keys create" in on and "60 requests/min" in on


def test_up_waits_for_the_slowest_drain_before_killing() -> None:
    settings = Settings(drain_timeout_s=10, gateway_drain_timeout_s=30,
                        gateway_shutdown_delay_s=2)
    assert up.stop_timeout_s(settings) == 32 + up.KILL_MARGIN_S


def test_up_refuses_zero_workers_and_a_busy_port(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "--workers", "0"]) == 1
    assert "--workers must be at least 1" in capsys.readouterr().err
    monkeypatch.setattr(up, "port_is_free", lambda port, host: False)
    assert cli.main(["up", "--port", "8123"]) == 1
    assert "port 8123 on 127.0.0.1 is in use" in capsys.readouterr().err


def test_up_children_run_this_cli() -> None:
    assert supervisor.role_argv("worker") == [sys.executable, "-m", "tokenfleet", "worker"]
    assert up.local_host("0.0.0.0") == "127.0.0.1"
    assert up.local_host("10.0.0.5") == "10.0.0.5"


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFLEET_PORT", "9000")
    assert cli.load_settings(port=None).port == 9000
    assert cli.load_settings(port=8123).port == 8123


def test_up_auto_takes_bounds_and_only_with_auto(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[int, object]] = []
    monkeypatch.setattr(up, "run_up", lambda settings, workers, scaling=None:
                        calls.append((workers, scaling)) or 0)
    monkeypatch.setenv("TOKENFLEET_SCALE_DOWN_IDLE_S", "7")
    assert cli.main(["up", "--workers", "auto", "--max-workers", "3"]) == 0
    (_, policy), = calls
    assert (policy.min_workers, policy.max_workers, policy.idle_s) == (0, 3, 7.0)
    assert cli.main(["up", "--workers", "2", "--max-workers", "3"]) == 1
    assert "need --workers auto" in capsys.readouterr().err
    assert cli.main(["up", "--workers", "auto", "--min-workers", "5", "--max-workers",
                     "3"]) == 1
    assert "--min-workers <= --max-workers" in capsys.readouterr().err
