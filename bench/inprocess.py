"""Systems that run inside the bench process: the naive and static-batching baselines,
transformers' continuous batching, and the tokenfleet engine.

All are driven as a closed loop (``clients`` concurrent users, each sending its next request
as soon as the previous one finished); the engine also supports an open loop (Poisson).
Baselines without streaming report TTFT as the time to the whole answer (that is what their
users see).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.metrics import RequestRecord
from bench.workload import BenchRequest
from shared.protocol import SamplingParams
from shared.settings import Settings
from worker.engine.engine import LLMEngine
from worker.engine.factory import engine_config, eos_token_ids, warm_up
from worker.engine.loader import LoadedModel, load_model
from worker.engine.model_runner import TransformerRunner
from worker.engine.types import EngineRequest

STATIC_WINDOW_S = 0.010
STATIC_MAX_BATCH = 32


@dataclass
class Bundle:
    """The model loaded once, shared by every in-process system."""

    loaded: LoadedModel
    prompt_ids: dict[str, list[int]]
    engine: LLMEngine

    @property
    def num_parameters(self) -> int:
        return int(self.loaded.model.num_parameters())

    def ids(self, request: BenchRequest) -> list[int]:
        if request.prompt not in self.prompt_ids:
            chat = self.loaded.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True)
            ids = chat if isinstance(chat, list) else chat["input_ids"]
            self.prompt_ids[request.prompt] = list(ids)
        return self.prompt_ids[request.prompt]


def load_bundle(settings: Settings, path: Path) -> Bundle:
    loaded = load_model(settings, path)
    engine = LLMEngine(TransformerRunner(loaded.model), loaded.tokenizer.backend_tokenizer,
                       engine_config(settings, eos_token_ids(loaded)))
    warm_up(engine)
    return Bundle(loaded, {}, engine)


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


# --- tokenfleet engine ----------------------------------------------------------------------
def run_engine(bundle: Bundle, per_client: list[list[BenchRequest]],
               arrivals: list[float] | None = None,
               ) -> tuple[list[RequestRecord], float, float]:
    """Closed loop over ``per_client`` queues, or open loop when ``arrivals`` (offsets in s,
    one per request in client-major order) is given. Returns records, wall time, mean batch."""
    engine = bundle.engine
    queues = [deque(q) for q in per_client]
    open_loop = deque(zip(arrivals, [r for q in per_client for r in q], strict=True)) \
        if arrivals is not None else None
    records: dict[str, RequestRecord] = {}
    owner: dict[str, int] = {}
    batch_sizes: list[int] = []
    start = time.perf_counter()

    def submit(client: int, request: BenchRequest, at: float) -> None:
        rid = f"c{client}-{request.index}"
        records[rid] = RequestRecord(submitted=at, client=client)
        owner[rid] = client
        engine.add_request(EngineRequest(rid, bundle.ids(request), _params(request.max_tokens)))

    if open_loop is None:
        for client, queue in enumerate(queues):
            if queue:
                submit(client, queue.popleft(), start)
    while engine.has_unfinished() or (open_loop if open_loop is not None else any(queues)):
        now = time.perf_counter()
        while open_loop and open_loop[0][0] <= now - start:
            offset, request = open_loop.popleft()
            submit(-1, request, start + offset)
        if not engine.has_unfinished():
            if open_loop:
                time.sleep(max(0.0, open_loop[0][0] - (time.perf_counter() - start)))
            continue
        outputs = engine.step()
        now = time.perf_counter()
        batch_sizes.append(engine.stats().num_running + sum(1 for o in outputs if o.finished))
        for out in outputs:
            rec = records[out.id]
            if out.new_token_ids:
                rec.output_tokens += len(out.new_token_ids)
                rec.token_times.append(now)
                rec.first_token = rec.first_token or now
            if out.finished:
                rec.finished = now
                rec.error = out.error
                client = owner[out.id]
                if client >= 0 and queues[client]:
                    submit(client, queues[client].popleft(), now)
    wall = time.perf_counter() - start
    return list(records.values()), wall, sum(batch_sizes) / max(len(batch_sizes), 1)


# --- naive: one model.generate at a time ----------------------------------------------------
def _generate(bundle: Bundle, prompts: list[list[int]], max_new: int) -> None:
    tok = bundle.loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        bundle.loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                     min_new_tokens=max_new, do_sample=False, pad_token_id=pad)


def run_naive(bundle: Bundle, per_client: list[list[BenchRequest]],
              ) -> tuple[list[RequestRecord], float, float]:
    """The seed article's naive server: requests served strictly one at a time."""
    queues = [deque(q) for q in per_client]
    start = time.perf_counter()
    pending = deque((c, queues[c].popleft(), start) for c in range(len(queues)) if queues[c])
    records = []
    while pending:
        client, request, submitted = pending.popleft()
        _generate(bundle, [bundle.ids(request)], request.max_tokens)
        now = time.perf_counter()
        records.append(RequestRecord(submitted, request.max_tokens, now, now, [now],
                                     client=client))
        if queues[client]:
            pending.append((client, queues[client].popleft(), now))
    return records, time.perf_counter() - start, 1.0


# --- static dynamic batching: window + max batch, one generate per batch --------------------
def run_static(bundle: Bundle, per_client: list[list[BenchRequest]],
               ) -> tuple[list[RequestRecord], float, float]:
    """Seed 003's batching server: wait up to a 10 ms window (or a full batch of 32), then
    one ``generate`` for the batch with the longest max_tokens in it."""
    queues = [deque(q) for q in per_client]
    start = time.perf_counter()
    waiting = deque((c, queues[c].popleft(), start) for c in range(len(queues)) if queues[c])
    records, sizes = [], []
    while waiting:
        if len(waiting) < STATIC_MAX_BATCH:
            time.sleep(STATIC_WINDOW_S)  # the window: in a closed loop nobody else arrives
        batch = [waiting.popleft() for _ in range(min(STATIC_MAX_BATCH, len(waiting)))]
        sizes.append(len(batch))
        longest = max(r.max_tokens for _, r, _ in batch)
        _generate(bundle, [bundle.ids(r) for _, r, _ in batch], longest)
        now = time.perf_counter()
        for client, request, submitted in batch:
            records.append(RequestRecord(submitted, request.max_tokens, now, now, [now],
                                         client=client))
            if queues[client]:
                waiting.append((client, queues[client].popleft(), now))
    return records, time.perf_counter() - start, sum(sizes) / max(len(sizes), 1)


# --- transformers' continuous batching ------------------------------------------------------
def run_hf_continuous(bundle: Bundle, per_client: list[list[BenchRequest]],
                      ) -> tuple[list[RequestRecord], float, float | None]:
    from transformers import GenerationConfig

    model = bundle.loaded.model
    config = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=-1)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    manager.add_request(bundle.ids(per_client[0][0]), request_id="warmup", max_new_tokens=4,
                        eos_token_id=-1)  # its start-up is not part of the measurement
    if manager.get_result(timeout=300) is None:
        raise TimeoutError("transformers continuous batching did not warm up in 300 s")
    queues = [deque(q) for q in per_client]
    records: dict[str, RequestRecord] = {}
    owner: dict[str, int] = {}
    start = time.perf_counter()

    def submit(client: int, request: BenchRequest, at: float) -> None:
        rid = f"c{client}-{request.index}"
        records[rid], owner[rid] = RequestRecord(submitted=at, client=client), client
        manager.add_request(bundle.ids(request), request_id=rid,
                            max_new_tokens=request.max_tokens, record_timestamps=True,
                            eos_token_id=-1)

    try:
        for client, queue in enumerate(queues):
            if queue:
                submit(client, queue.popleft(), start)
        remaining = sum(len(q) for q in per_client)
        while remaining:
            result = manager.get_result(timeout=300)
            if result is None:
                raise TimeoutError("transformers continuous batching returned nothing in 300 s")
            now = time.perf_counter()
            rec = records[result.request_id]
            rec.output_tokens = len(result.generated_tokens)
            rec.token_times = list(result.timestamps or [now])
            rec.first_token, rec.finished = rec.token_times[0], now
            rec.error = result.error
            remaining -= 1
            client = owner[result.request_id]
            if queues[client]:
                submit(client, queues[client].popleft(), now)
    finally:
        manager.stop(block=True)
    return list(records.values()), time.perf_counter() - start, None


def matmul_flops(dtype: torch.dtype = torch.bfloat16, size: int = 2048, repeats: int = 5,
                 ) -> float:
    """Best-of-``repeats`` FLOP/s of a square matmul on this machine (the efficiency yardstick)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
