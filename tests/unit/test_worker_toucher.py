"""The toucher keeps a live loop's entries fresh, and lets a wedged loop's requests go."""

from __future__ import annotations

import threading
from typing import Any

from worker.reclaimer import Toucher


class RecordingReclaimer:
    def __init__(self) -> None:
        self.touched = threading.Event()
        self.calls: list[Any] = []

    def touch(self, in_flight: Any) -> set[tuple[str, bytes]]:
        self.calls.append(tuple(in_flight))
        self.touched.set()
        return set()


def test_a_turning_loop_is_touched() -> None:
    reclaimer = RecordingReclaimer()
    toucher = Toucher(reclaimer, interval_s=0.01, stall_timeout_s=60.0)  # type: ignore[arg-type]
    toucher.set_in_flight([("s", b"1-0")])
    toucher.start()
    try:
        assert reclaimer.touched.wait(5.0)
    finally:
        toucher.stop()
    assert reclaimer.calls[0] == (("s", b"1-0"),)


def test_a_wedged_loop_stops_being_touched() -> None:
    reclaimer = RecordingReclaimer()
    toucher = Toucher(reclaimer, interval_s=0.01, stall_timeout_s=0.0)  # type: ignore[arg-type]
    toucher.set_in_flight([("s", b"1-0")])
    assert toucher.is_stalled()  # no mark_progress within 0 s
    toucher.mark_progress()
    toucher.stall_timeout_s = 3600.0
    assert not toucher.is_stalled()
    toucher.stall_timeout_s = 0.0
    toucher.start()
    try:
        assert not reclaimer.touched.wait(0.3)  # many intervals, not one touch
    finally:
        toucher.stop()
    assert reclaimer.calls == []
