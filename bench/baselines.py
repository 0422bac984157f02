"""What tokenfleet is compared with, on the same loaded model and dtype:

- ``naive``: seed 000/003's naive server: one ``model.generate`` per request, strictly one at
  a time, whatever the number of clients;
- ``static``: seed 003's batching server: wait a 10 ms window (or until 32 requests wait),
  then one ``generate`` for the left-padded batch with the longest ``max_tokens`` in it;
- ``hf-cb``: transformers' own continuous batching (``init_continuous_batching``).

``naive`` and ``static`` do not stream: their TTFT is the time to the whole answer, which is
what their users see. Each request counts only its own ``max_tokens`` output tokens.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from bench.inprocess import Bundle, wait_for_arrival
from bench.loadgen import Load, Submission
from bench.metrics import RequestRecord, RunResult

STATIC_WINDOW_S = 0.010
STATIC_MAX_BATCH = 32
HF_RESULT_TIMEOUT_S = 300.0


def generate(bundle: Bundle, prompts: list[list[int]], max_new: int) -> None:
    """One greedy ``model.generate`` over left-padded prompts, exactly ``max_new`` tokens."""
    tok = bundle.loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        bundle.loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                     min_new_tokens=max_new, do_sample=False, pad_token_id=pad)


def _whole_answer(sub: Submission, now: float) -> RequestRecord:
    """A non-streamed answer: every token (and so the first) arrives at ``now``."""
    return RequestRecord(sub.submitted, sub.request.max_tokens, now, now, [now],
                         client=sub.client)


def run_naive(bundle: Bundle, load: Load) -> RunResult:
    """Requests served strictly one at a time, in arrival order."""
    start = time.perf_counter()
    pending = deque(load.start(start))
    records = []
    while pending or not load.is_exhausted:
        pending.extend(load.due(time.perf_counter()))
        if not pending:
            wait_for_arrival(load)
            continue
        sub = pending.popleft()
        generate(bundle, [bundle.ids(sub.request)], sub.request.max_tokens)
        now = time.perf_counter()
        records.append(_whole_answer(sub, now))
        pending.extend(load.finished(sub.client, now))
    return RunResult(records, time.perf_counter() - start, 1.0)


def run_static(bundle: Bundle, load: Load) -> RunResult:
    """A window of ``STATIC_WINDOW_S`` (skipped when a full batch already waits), then one
    ``generate`` for up to ``STATIC_MAX_BATCH`` requests, ``max_new_tokens`` = the batch's
    longest. Nobody in the batch gets an answer before the longest is done."""
    start = time.perf_counter()
    waiting = deque(load.start(start))
    records, sizes = [], []
    while waiting or not load.is_exhausted:
        waiting.extend(load.due(time.perf_counter()))
        if not waiting:
            wait_for_arrival(load)
            continue
        if len(waiting) < STATIC_MAX_BATCH:
            time.sleep(STATIC_WINDOW_S)
            waiting.extend(load.due(time.perf_counter()))
        batch = [waiting.popleft() for _ in range(min(STATIC_MAX_BATCH, len(waiting)))]
        sizes.append(len(batch))
        generate(bundle, [bundle.ids(s.request) for s in batch],
                 max(s.request.max_tokens for s in batch))
        now = time.perf_counter()
        for sub in batch:
            records.append(_whole_answer(sub, now))
            waiting.extend(load.finished(sub.client, now))
    return RunResult(records, time.perf_counter() - start, sum(sizes) / max(len(sizes), 1))


def run_hf_continuous(bundle: Bundle, load: Load) -> RunResult:
    """transformers' continuous batching with its default configuration, warmed up first;
    per-token times come from its own ``record_timestamps`` (``time.perf_counter``)."""
    from transformers import GenerationConfig

    model = bundle.loaded.model
    config = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=-1)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    records: dict[str, RequestRecord] = {}

    def submit(subs: list[Submission]) -> None:
        for sub in subs:
            rid = sub.request_id
            records[rid] = RequestRecord(submitted=sub.submitted, client=sub.client)
            manager.add_request(bundle.ids(sub.request), request_id=rid,
                                max_new_tokens=sub.request.max_tokens, record_timestamps=True,
                                eos_token_id=-1)

    try:
        manager.add_request([1, 2, 3, 4, 5, 6, 7, 8], request_id="warmup", max_new_tokens=4,
                            eos_token_id=-1)  # its start-up is not part of the measurement
        if manager.get_result(timeout=HF_RESULT_TIMEOUT_S) is None:
            raise TimeoutError(f"no warm-up result in {HF_RESULT_TIMEOUT_S:.0f} s")
        start = time.perf_counter()
        submit(load.start(start))
        outstanding = len(records)
        while outstanding or not load.is_exhausted:
            submit(due := load.due(time.perf_counter()))
            outstanding += len(due)
            if not outstanding:
                wait_for_arrival(load)
                continue
            nxt = load.next_arrival()
            timeout = HF_RESULT_TIMEOUT_S if nxt is None else max(0.001, nxt - time.perf_counter())
            result = manager.get_result(timeout=timeout)
            if result is None:
                if nxt is None:
                    raise TimeoutError(f"no result in {HF_RESULT_TIMEOUT_S:.0f} s")
                continue
            now = time.perf_counter()
            rec = records[result.request_id]
            rec.output_tokens = len(result.generated_tokens)
            rec.token_times = list(result.timestamps or [now])
            rec.first_token, rec.finished = rec.token_times[0], now
            rec.error = result.error
            outstanding -= 1
            nxt_subs = load.finished(rec.client, now)
            submit(nxt_subs)
            outstanding += len(nxt_subs)
        wall = time.perf_counter() - start  # before stop(): joining its thread is not serving
    finally:
        manager.stop(block=True)
    return RunResult(list(records.values()), wall, None)
