"""``tokenfleet gateway --workers N``: the command wiring, and what the parent of N gateway
processes does when one exits (fake processes: no fork, no Redis)."""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway import processes, server
from gateway.processes import ProcessGroup, reuse_port_socket
from shared.settings import Settings
from tokenfleet import cli, up

# --- the command ------------------------------------------------------------------------


def test_gateway_workers_flag_reaches_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []
    monkeypatch.setattr(server, "run", lambda settings: seen.append(settings) or 0)
    assert cli.main(["gateway", "--workers", "3", "--port", "8123"]) == 0
    assert (seen[0].gateway_workers, seen[0].port) == (3, 8123)
    monkeypatch.setenv("TOKENFLEET_GATEWAY_WORKERS", "2")
    assert cli.main(["gateway"]) == 0
    assert seen[1].gateway_workers == 2  # the environment when no flag is given


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_gateway_workers_must_be_a_positive_number(value: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["gateway", "--workers", value])
    assert exc.value.code == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err


def test_up_passes_gateway_workers_on(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []
    monkeypatch.setattr(up, "run_up", lambda settings, workers, scaling=None:
                        seen.append(settings) or 0)
    assert cli.main(["up", "--gateway-workers", "2"]) == 0
    assert seen[0].gateway_workers == 2


def test_run_starts_processes_only_for_more_than_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(processes, "run_processes",
                        lambda settings, n: calls.append(("processes", n)) or 0)
    monkeypatch.setattr(server, "serve", lambda settings: calls.append(("serve", 1)))
    assert server.run(Settings(gateway_workers=1)) == 0
    assert server.run(Settings(gateway_workers=2)) == 0
    assert calls == [("serve", 1), ("processes", 2)]


def test_zero_gateway_workers_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="TOKENFLEET_GATEWAY_WORKERS must be >= 1"):
        Settings(gateway_workers=0)


@pytest.mark.skipif(not processes.can_share_port(), reason="SO_REUSEPORT balancing: Linux")
def test_processes_can_bind_one_port_while_the_parent_holds_it() -> None:
    with reuse_port_socket("127.0.0.1", 0) as holder:
        port = holder.getsockname()[1]
        with reuse_port_socket("127.0.0.1", port) as one, \
                reuse_port_socket("127.0.0.1", port) as two:
            one.listen()
            two.listen()
            assert one.getsockname()[1] == two.getsockname()[1] == port
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # nobody else gets the port meanwhile


# --- the parent -------------------------------------------------------------------------


@dataclass
class FakeEvent:
    is_ready: bool = False

    def set(self) -> None:
        self.is_ready = True

    def is_set(self) -> bool:
        return self.is_ready


@dataclass
class FakeProcess:
    pid: int
    exitcode: int | None = None
    sentinel: int = -1

    def start(self) -> None:
        pass

    def join(self) -> None:
        pass


@dataclass
class FakeContext:
    started: list[FakeProcess] = field(default_factory=list)

    def Event(self) -> FakeEvent:
        return FakeEvent()

    def Process(self, **kwargs: Any) -> FakeProcess:
        proc = FakeProcess(pid=1000 + len(self.started))
        self.started.append(proc)
        return proc


def _group(monkeypatch: pytest.MonkeyPatch) -> tuple[ProcessGroup, FakeContext, list[Any]]:
    ctx = FakeContext()
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(processes.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    group = ProcessGroup(Settings(), 2, ctx)  # type: ignore[arg-type]
    group.start_all()
    return group, ctx, killed


def test_a_process_that_dies_after_it_served_is_replaced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    group, ctx, killed = _group(monkeypatch)
    for entry in group.processes:
        entry.ready.set()
    ctx.started[0].exitcode = -9
    group.check()
    assert len(ctx.started) == 3 and not group.failed and not killed
    assert sorted(e.index for e in group.processes) == [0, 1]


def test_a_process_that_never_got_ready_stops_the_gateway(
        monkeypatch: pytest.MonkeyPatch) -> None:
    group, ctx, killed = _group(monkeypatch)
    ctx.started[1].exitcode = 3
    group.check()
    assert group.failed and group.is_stopping and len(ctx.started) == 2
    assert killed == [(1000, signal.SIGTERM)]  # the other one drains


def test_signals_are_forwarded_and_a_drained_group_exits_0(
        monkeypatch: pytest.MonkeyPatch) -> None:
    group, ctx, killed = _group(monkeypatch)
    group.forward(signal.SIGTERM)
    group.forward(signal.SIGTERM)  # a second signal reaches every process too
    assert killed == [(1000, signal.SIGTERM), (1001, signal.SIGTERM)] * 2
    for proc in ctx.started:
        proc.exitcode = 0
    monkeypatch.setattr(group, "wait", lambda timeout_s: None)
    assert group.supervise() == 0
    assert len(ctx.started) == 2  # nothing restarted while stopping


def test_a_process_that_fails_its_drain_makes_the_exit_code_1(
        monkeypatch: pytest.MonkeyPatch) -> None:
    group, ctx, _ = _group(monkeypatch)
    group.forward(signal.SIGTERM)
    ctx.started[0].exitcode, ctx.started[1].exitcode = 0, 1
    monkeypatch.setattr(group, "wait", lambda timeout_s: None)
    assert group.supervise() == 1
