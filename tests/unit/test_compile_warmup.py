"""The compiled decode step warmed up in the background (worker/engine/compile_warmup.py).

One test compiles for real (the tiny fp32 Llama, the batch-1 graph only, down_proj left
unpacked so the layer graph mixes packed and plain projections); the others use fakes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from shared.protocol import SamplingParams
from shared.settings import Settings
from tests.unit.tiny_model import EOS, CharDecoder, tiny_llama
from worker.engine.compile_warmup import CompileWarmup
from worker.engine.compiled_step import CompiledDecode, UnsupportedCompileError
from worker.engine.engine import EngineConfig, LLMEngine
from worker.engine.model_runner import FORWARD_LOCK, TransformerRunner
from worker.engine.types import EngineRequest
from worker.heartbeat import WorkerStatus

PROMPT = [5, 9, 11, 3, 40, 41, 7]
MAX_TOKENS = 24


def _engine(runner: TransformerRunner) -> LLMEngine:
    return LLMEngine(runner, CharDecoder(), EngineConfig(eos_token_ids=(EOS,)))


def _add(engine: LLMEngine) -> None:
    engine.add_request(EngineRequest("r", PROMPT, SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)))


def _tokens_until(engine: LLMEngine, done: Callable[[list[int]], bool],
                  tokens: list[int]) -> list[int]:
    while engine.has_unfinished() and not done(tokens):
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    return tokens


def _down_unpacked(model: torch.nn.Module) -> TransformerRunner:
    """As fp32 on AVX-512 runs SmolLM2: down_proj on F.linear (its packed probe fails)."""
    runner = TransformerRunner(model)
    for f in runner.fused:
        assert f is not None
        f.down_packed = None
    runner.rows_invariant = False
    return runner


class FakeCompiled:
    """Stands in for ``CompiledDecode``: its warm-up raises or waits for a gate."""

    def __init__(self, error: Exception | None = None,
                 gate: threading.Event | None = None) -> None:
        self.error = error
        self.gate = gate
        self.graphs = 0

    def warm_up(self, batches: tuple[int, ...] = (1, 2, 4),
                should_stop: Callable[[], bool] | None = None) -> float:
        for _ in batches:
            if self.gate is not None:
                assert self.gate.wait(30)
            if should_stop is not None and should_stop():
                return 0.0
            if self.error is not None:
                raise self.error
            self.graphs += 1
        return 0.0


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()  # no graphs (nor recompile counts) of other tests
    yield
    torch._dynamo.reset()


def test_serves_eager_until_attached_then_the_same_greedy_tokens(
        tmp_path: Path, fresh_dynamo: None) -> None:
    model = tiny_llama(torch.float32)
    eager = _engine(_down_unpacked(model))
    _add(eager)
    expected = _tokens_until(eager, lambda _: False, [])
    assert len(expected) == MAX_TOKENS

    runner = _down_unpacked(model)
    gate = threading.Event()
    warm = CompileWarmup(runner, "decode", batches=(1,), before_warm_up=gate.wait,
                         build=lambda r, _mode: CompiledDecode(r, cache_dir=tmp_path))
    engine = _engine(runner)
    warm.start("background")
    assert engine.stats().compiled == "warming"
    _add(engine)
    tokens = _tokens_until(engine, lambda t: len(t) >= 8, [])
    assert runner.compiled is None  # the warm-up is held back: these 8 tokens were eager

    gate.set()
    assert warm.join(timeout=900)
    assert warm.state == engine.stats().compiled == "active"
    compiled = runner.compiled
    assert compiled is not None and compiled.spec.packed[3] is False  # down_proj: F.linear
    compiled.stance = "fail_on_recompile"  # the warm-up built the graph serving uses
    calls = []
    layers = compiled.layers
    compiled.layers = lambda *a: calls.append(1) or layers(*a)  # type: ignore[method-assign]
    tokens = _tokens_until(engine, lambda _: False, tokens)
    assert len(calls) == MAX_TOKENS - 8  # every later decode step ran the compiled graph
    assert tokens == expected


def test_a_failed_warm_up_leaves_decode_eager(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama(torch.float32)
    runner = TransformerRunner(model)
    warm = CompileWarmup(runner, "decode",
                         build=lambda _r, _m: FakeCompiled(RuntimeError("inductor broke")))
    with caplog.at_level(logging.WARNING):
        warm.start("background")
        assert warm.join(timeout=30)
    assert warm.state == runner.compile_state == "failed"
    assert runner.compiled is None
    assert "failed to warm up" in caplog.text and "inductor broke" in caplog.text
    engine = _engine(runner)
    _add(engine)
    assert len(_tokens_until(engine, lambda _: False, [])) == MAX_TOKENS
    assert engine.stats().compiled == "failed"


def test_blocking_attaches_before_it_returns() -> None:
    runner = TransformerRunner(tiny_llama(torch.float32))
    fake = FakeCompiled()
    warm = CompileWarmup(runner, "decode", build=lambda _r, _m: fake)
    warm.start("blocking")
    assert runner.compiled is fake and fake.graphs == 3
    assert warm.state == "active" and warm.attached_after_s is not None


def test_stop_ends_a_background_warm_up_before_its_next_graph() -> None:
    runner = TransformerRunner(tiny_llama(torch.float32))
    gate = threading.Event()
    fake = FakeCompiled(gate=gate)
    warm = CompileWarmup(runner, "decode", build=lambda _r, _m: fake)
    warm.start("background")
    warm._stop.set()
    gate.set()
    assert warm.join(timeout=30)
    assert warm.state == "stopped" and runner.compiled is None and fake.graphs == 0


class TracingCompiled:
    """A warm-up that traces with torch.fx, as dynamo and inductor do."""

    def __init__(self) -> None:
        self.lock_held: list[bool] = []

    def warm_up(self, batches: tuple[int, ...] = (1, 2, 4),
                should_stop: Callable[[], bool] | None = None) -> float:
        def fn(x: torch.Tensor) -> torch.Tensor:
            self.lock_held.append(FORWARD_LOCK._is_owned())  # type: ignore[attr-defined]
            return x + 1

        torch.fx.symbolic_trace(fn)
        return 0.0


def test_fx_traces_in_the_background_hold_the_forward_lock() -> None:
    """torch.fx patches nn.Module.__call__ for all threads while it traces: no forward
    pass may run meanwhile (the runner holds FORWARD_LOCK for each)."""
    runner = TransformerRunner(tiny_llama(torch.float32))
    fake = TracingCompiled()
    original = torch.fx.Tracer.trace
    warm = CompileWarmup(runner, "decode", build=lambda _r, _m: fake)
    with FORWARD_LOCK:  # a step in progress: the trace waits for it
        warm.start("background")
        assert not warm.join(timeout=0.2)
        assert fake.lock_held == []
    assert warm.join(timeout=30)
    assert fake.lock_held == [True] and warm.state == "active"
    assert torch.fx.Tracer.trace is original  # the patch ends with the warm-up


def test_off_starts_nothing() -> None:
    runner = TransformerRunner(tiny_llama(torch.float32))
    warm = CompileWarmup(runner, "off")
    warm.start("background")
    assert warm._thread is None and runner.compile_state == "off" and runner.compiled is None


def test_layers_packed_differently_say_which_projections() -> None:
    runner = TransformerRunner(tiny_llama(torch.float32))
    if runner.fused[1] is None or runner.fused[1].down_packed is None:
        pytest.skip("fp32 down_proj is not packed on this CPU")
    runner.fused[1].down_packed = None
    with pytest.raises(UnsupportedCompileError, match=r"layer 1 runs .*F\.linear: down_proj"):
        CompiledDecode(runner)


def test_setting_and_heartbeat_field(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().compile_warmup == "background"
    monkeypatch.setenv("TOKENFLEET_COMPILE_WARMUP", "blocking")
    assert Settings().compile_warmup == "blocking"
    status = WorkerStatus(worker_id="w", model="m")
    assert status.to_mapping()["compiled"] == "off"
    runner = TransformerRunner(tiny_llama(torch.float32))
    runner.compile_state = "warming"
    status.update(_engine(runner).stats())
    assert status.to_mapping()["compiled"] == "warming"


def test_a_worker_stopped_mid_warm_up_ends_the_process_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter's own exit aborts under a thread inside inductor (C++ terminate)."""
    import worker.engine.compile_warmup as compile_warmup
    import worker.main as worker_main

    exits: list[int] = []
    monkeypatch.setattr(worker_main.os, "_exit", exits.append)
    monkeypatch.setattr(worker_main.logging, "shutdown", lambda: None)
    worker_main.exit_if_compiling(0)
    assert exits == []  # no warm-up running: the normal exit
    monkeypatch.setattr(compile_warmup, "any_warming", lambda: True)
    worker_main.exit_if_compiling(3)
    assert exits == [3]
