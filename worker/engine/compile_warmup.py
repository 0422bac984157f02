"""Builds the compiled decode step off the serving path (``TOKENFLEET_COMPILE_WARMUP``).

``background`` (the default): the worker serves at its eager start time. A daemon thread
compiles (or loads from inductor's disk cache) every graph of ``CompiledDecode`` on scratch
tensors, never touching the runner's KV cache; the runner's ``compiled`` stays None, so
decode runs eager, until all graphs are built. Then one attribute write attaches it: the
runner reads ``compiled`` once per step, so a step runs wholly eager or wholly compiled.
Dynamo compiles in the calling thread (its frame hook and the dispatch-mode stack are
thread-local); the serving thread meanwhile runs plain eager torch ops. The compiled
function is only ever called by one thread at a time: the warm-up thread before the
attach, the serving thread after it.

``blocking``: the old behaviour, the warm-up runs before the engine's first step (a fully
compiled worker before it serves, at a longer start).

Either way a failed warm-up logs a warning and leaves decode eager; it never fails the
worker. ``state`` says where it stands ("off", "warming", "active", "failed", "stopped"):
the engine's stats, the heartbeat's ``compiled`` field and the worker's metrics carry it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

from worker.engine.compiled_step import maybe_compile
from worker.engine.model_runner import FORWARD_LOCK
from worker.engine.types import COMPILE_STATES

if TYPE_CHECKING:
    from worker.engine.model_runner import TransformerRunner

log = logging.getLogger(__name__)

WarmupMode = Literal["background", "blocking"]
# While a background warm-up runs, the serving thread gets the GIL back after each torch op
# within this (Python's default 5 ms made every op of a step wait behind dynamo's tracing:
# the first token came 7 s late under =step); restored after the warm-up.
WARMUP_SWITCH_INTERVAL_S = 1e-4
WARMUP_NICE = 10  # the warm-up thread (and the compiler processes it starts) yield the CPU


class Warmable(Protocol):
    """What is attached as ``runner.compiled`` (``CompiledDecode``; tests pass fakes)."""

    def warm_up(self, batches: tuple[int, ...] = ...,
                should_stop: Callable[[], bool] | None = None) -> float: ...


_threads: list[threading.Thread] = []  # background warm-ups started in this process


def any_warming() -> bool:
    """A background warm-up is still running (the process must then end with ``os._exit``:
    finalizing the interpreter under a thread inside inductor aborts it, "terminate called
    without an active exception"; worker/main.py does that)."""
    return any(t.is_alive() for t in _threads)


@contextlib.contextmanager
def traces_exclude_forward_passes() -> Iterator[None]:
    """While inside, every ``torch.fx`` trace (dynamo's, AOTAutograd's, inductor's: they all
    go through ``Tracer.trace``) holds ``FORWARD_LOCK``: the tracer patches
    ``torch.nn.Module.__call__`` process-wide, and a serving step calling a module through
    it fails ("module is not installed as a submodule", seen once under a cold compile)."""
    from torch.fx import Tracer

    original = Tracer.trace

    @functools.wraps(original)
    def trace(self: Tracer, *args: Any, **kwargs: Any) -> Any:
        with FORWARD_LOCK:
            return original(self, *args, **kwargs)

    Tracer.trace = trace  # type: ignore[method-assign]
    try:
        yield
    finally:
        Tracer.trace = original  # type: ignore[method-assign]


class CompileWarmup:
    """Warms ``runner``'s compiled decode step up, in a thread or in the caller, and
    attaches it when every graph is ready."""

    def __init__(self, runner: TransformerRunner, mode: str, *,
                 build: Callable[[TransformerRunner, str], Warmable | None] = maybe_compile,
                 batches: tuple[int, ...] = (1, 2, 4),
                 before_warm_up: Callable[[], None] | None = None) -> None:
        """``build``: the compiled step for ``TOKENFLEET_COMPILE=mode`` or None (off or
        unsupported: eager). ``before_warm_up`` runs in the warm-up's thread first (tests
        hold the warm-up back with it)."""
        self.runner = runner
        self.mode = mode
        self.build = build
        self.batches = batches
        self.before_warm_up = before_warm_up
        self.state = "off"
        self.attached_after_s: float | None = None  # from start() to the attach
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        runner.compile_state = self.state

    def _set_state(self, state: str) -> None:
        assert state in COMPILE_STATES
        self.state = state
        self.runner.compile_state = state

    def start(self, how: WarmupMode = "background") -> None:
        """Build the compiled step (probes, dynamo's imports, a ``torch.compile`` wrapper:
        ~0.5 s) and warm it up: in a daemon thread (``background``) or here
        (``blocking``)."""
        if self.mode == "off":
            return
        self._set_state("warming")
        started = time.perf_counter()
        if how == "blocking":
            self._build_warm_and_attach(started)
            return
        self._thread = threading.Thread(target=self._background, args=(started,),
                                        name="compile-warmup", daemon=True)
        _threads.append(self._thread)
        self._thread.start()
        log.info("compiled decode step (TOKENFLEET_COMPILE=%s) warming up in the "
                 "background; decode runs eager until it is attached", self.mode)

    def _background(self, started: float) -> None:
        """The thread: lower its CPU priority (Linux: per thread; inductor's compiler
        processes inherit it), shorten the GIL's switch interval and keep torch.fx traces
        and forward passes apart while it runs."""
        if WARMUP_NICE:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               os.getpriority(os.PRIO_PROCESS, 0) + WARMUP_NICE)
            except (AttributeError, OSError) as exc:
                log.debug("could not lower the warm-up thread's priority: %r", exc)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, WARMUP_SWITCH_INTERVAL_S))
        try:
            with traces_exclude_forward_passes():
                self._build_warm_and_attach(started)
        finally:
            sys.setswitchinterval(interval)

    def _build_warm_and_attach(self, started: float) -> None:
        try:
            compiled = self.build(self.runner, self.mode)
            if compiled is None:  # unsupported (maybe_compile logged why): eager
                self._set_state("off")
                return
            if self.before_warm_up is not None:
                self.before_warm_up()
            compiled.warm_up(self.batches, should_stop=self._stop.is_set)
        except Exception as exc:  # a compiler error, a full disk, OOM: serving goes on eager
            self._set_state("failed")
            log.warning("compiled decode step (TOKENFLEET_COMPILE=%s) failed to warm up after "
                        "%.1f s; decode stays eager: %r", self.mode,
                        time.perf_counter() - started, exc, exc_info=True)
            return
        if self._stop.is_set():
            self._set_state("stopped")
            return
        self.runner.compiled = compiled  # type: ignore[assignment]  # one write: between steps
        self.attached_after_s = time.perf_counter() - started
        self._set_state("active")
        log.info("compiled decode step attached after %.1f s", self.attached_after_s)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for a background warm-up; True once it has ended (attached or not)."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self, timeout: float = 0.0) -> None:
        """Ask the warm-up to end before its next graph (a graph being compiled finishes
        first; the thread is a daemon, so the process never waits for it at exit)."""
        self._stop.set()
        self.join(timeout)
