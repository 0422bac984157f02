"""The model loaded once for every in-process system, the tokenfleet engine driven in-process,
and the matmul yardstick (in the dtype the engine runs: bf16 only where it is native).

The engine is driven by the same ``Load`` as every other system: a closed loop (a client
sends its next request as soon as its previous one finished) or an open loop (Poisson
arrivals). ``bench.baselines`` holds the systems tokenfleet is compared with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bench.loadgen import Load, Submission
from bench.metrics import RequestRecord, RunResult
from bench.workload import BenchRequest
from shared.protocol import SamplingParams
from shared.settings import Settings
from worker.engine.engine import LLMEngine
from worker.engine.factory import engine_config, eos_token_ids, load_runner, warm_up
from worker.engine.loader import LoadedModel
from worker.engine.scheduler import SchedulingPolicy
from worker.engine.speculative import SpeculativeMethod
from worker.engine.types import EngineRequest

DEFAULT_PREFIX_CACHE_TOKENS = 8192  # "on" when the settings turn the cache off


@dataclass
class Bundle:
    """The model loaded once, shared by every in-process system."""

    loaded: LoadedModel
    prompt_ids: dict[str, list[int]]
    engine: LLMEngine
    engines: dict[str, LLMEngine] = field(default_factory=dict)  # per scheduling policy

    def engine_for(self, policy: SchedulingPolicy | None,
                   prefix_cache: bool | None = None,
                   speculative: SpeculativeMethod | None = None) -> LLMEngine:
        """The engine with that scheduling policy (None: the settings' one) and prefix cache
        (on: the settings' size, or 8192 tokens if that is 0; off; None: the settings'), over
        the same warmed-up model runner (one engine steps at a time, so they share its cache).
        A prefix-cache engine starts each run with an empty pool (``run_engine``).
        ``speculative``: the speculative method (None: the settings')."""
        config = self.engine.config
        if policy is not None:
            config = replace(config, scheduling=policy)
        if prefix_cache is not None:
            tokens = (config.prefix_cache_tokens or DEFAULT_PREFIX_CACHE_TOKENS
                      if prefix_cache else 0)
            config = replace(config, prefix_cache_tokens=tokens)
        if speculative is not None:
            config = replace(config, speculative=replace(config.speculative,
                                                         method=speculative))
        if config == self.engine.config:
            return self.engine
        key = f"{config.scheduling}/{config.prefix_cache_tokens}/{config.speculative.method}"
        if key not in self.engines:
            self.engines[key] = LLMEngine(self.engine.runner, self.engine.decoder, config)
        return self.engines[key]

    @property
    def num_parameters(self) -> int:
        return int(self.loaded.model.num_parameters())

    def ids(self, request: BenchRequest) -> list[int]:
        """The chat-templated prompt tokens, as the gateway would build them."""
        if request.key not in self.prompt_ids:
            chat = self.loaded.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True)
            ids = chat if isinstance(chat, list) else chat["input_ids"]
            self.prompt_ids[request.key] = list(ids)
        return self.prompt_ids[request.key]


def load_bundle(settings: Settings, path: Path) -> Bundle:
    loaded, runner, _ = load_runner(settings, path)  # kernels and compiled graphs attached
    engine = LLMEngine(runner, loaded.tokenizer.backend_tokenizer,
                       engine_config(settings, eos_token_ids(loaded)))
    warm_up(engine)
    return Bundle(loaded, {}, engine)


def wait_for_arrival(load: Load) -> None:
    """Sleep until the next open-loop arrival (returns at once when there is none)."""
    nxt = load.next_arrival()
    if nxt is not None:
        time.sleep(max(0.0, nxt - time.perf_counter()))


def greedy_exact(max_tokens: int) -> SamplingParams:
    """Greedy, and exactly ``max_tokens`` tokens (``ignore_eos``)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_engine(bundle: Bundle, load: Load, policy: SchedulingPolicy | None = None,
               prefix_cache: bool | None = None,
               speculative: SpeculativeMethod | None = None) -> RunResult:
    """Drive ``LLMEngine`` with ``add_request``/``step``. The mean batch is the running count
    averaged over the steps (the rows that finished in a step count as running in it).
    ``policy``: the scheduling policy (None: the settings' one); ``prefix_cache``: on, off
    or None (the settings'). The prefix cache starts empty: the first requests miss.
    ``speculative``: the speculative method (None: the settings')."""
    engine = bundle.engine_for(policy, prefix_cache, speculative)
    if engine.prefix is not None:
        engine.prefix.clear()
    records: dict[str, RequestRecord] = {}
    batch_sizes: list[int] = []

    def submit(subs: list[Submission]) -> None:
        for sub in subs:
            rid = sub.request_id
            records[rid] = RequestRecord(submitted=sub.submitted, client=sub.client)
            engine.add_request(EngineRequest(rid, bundle.ids(sub.request),
                                             greedy_exact(sub.request.max_tokens),
                                             arrival_time=time.monotonic()))

    start = time.perf_counter()
    submit(load.start(start))
    while engine.has_unfinished() or not load.is_exhausted:
        submit(load.due(time.perf_counter()))
        if not engine.has_unfinished():
            wait_for_arrival(load)
            continue
        outputs = engine.step()
        now = time.perf_counter()
        if outputs:
            batch_sizes.append(engine.stats().num_running
                               + sum(1 for o in outputs if o.finished))
        for out in outputs:
            rec = records[out.id]
            if out.new_token_ids:
                rec.output_tokens += len(out.new_token_ids)
                rec.token_times.append(now)
                rec.first_token = rec.first_token or now
            if out.finished:
                rec.finished = now
                rec.error = out.error
                submit(load.finished(rec.client, now))
    wall = time.perf_counter() - start
    return RunResult(list(records.values()), wall,
                     sum(batch_sizes) / len(batch_sizes) if batch_sizes else None)


def matmul_flops(dtype: torch.dtype, device: torch.device | None = None, size: int = 2048,
                 repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a square matmul in ``dtype`` (the engine's: measuring bf16
    on a CPU that only emulates it would take minutes and measure nothing the engine does)."""
    device = device or torch.device("cpu")
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
