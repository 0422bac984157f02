"""Seconds from process start to a warm engine, as a worker builds it (``TOKENFLEET_*``).

    TOKENFLEET_COMPILE=decode python -m bench.worker_start [--serve-while-warming]

Prints when the weights were loaded, when the engine was warm (ready to serve; with
``TOKENFLEET_COMPILE_WARMUP=blocking`` the compiled graphs are built before that), when a
first request then got its first token, and with ``background`` (the default) when the
compiled decode step was attached, all counted from before the engine's imports.
``--serve-while-warming``: keep one greedy request decoding until the attach and print the
decode rate during the warm-up and after it (batch 1).
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

_ids = itertools.count()


def _generate(engine: Any, max_tokens: int) -> tuple[float | None, int]:
    """One greedy request to its end: (seconds to its first token, tokens)."""
    from shared.protocol import SamplingParams
    from worker.engine.types import EngineRequest

    engine.add_request(EngineRequest(f"r{next(_ids)}", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(
        max_tokens=max_tokens, temperature=0, ignore_eos=True)))
    start, first, count = time.perf_counter(), None, 0
    while engine.has_unfinished():
        new = sum(len(out.new_token_ids) for out in engine.step())
        if new and first is None:
            first = time.perf_counter() - start
        count += new
    return first, count


def main() -> None:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m bench.worker_start")
    parser.add_argument("--serve-while-warming", action="store_true")
    args = parser.parse_args()
    from shared.settings import Settings
    from worker.engine.factory import build_engine

    marks: dict[str, float] = {}
    engine, _ = build_engine(
        Settings(), on_stage=lambda s: marks.__setitem__(s, time.perf_counter() - start))
    runner = engine.runner
    ready = time.perf_counter()
    first, _ = _generate(engine, 16)
    line = (f"weights {marks['weights']:.1f} s, warm engine {marks['warmup']:.1f} s, "
            f"first token {marks['warmup'] + (first or 0):.1f} s, "
            f"16 tokens {time.perf_counter() - start:.1f} s")
    tokens = 16
    while args.serve_while_warming and getattr(runner, "compile_state", "off") == "warming":
        tokens += _generate(engine, 32)[1]
    warming_rate = tokens / (time.perf_counter() - ready)
    while getattr(runner, "compile_state", "off") == "warming":
        time.sleep(0.05)
    state = getattr(runner, "compile_state", "off")
    if state != "off":
        line += f", compiled step {state} at {time.perf_counter() - start:.1f} s"
    if args.serve_while_warming:
        after = time.perf_counter()
        count = sum(_generate(engine, 32)[1] for _ in range(4))
        line += (f"; decode {warming_rate:.1f} tok/s while warming, "
                 f"{count / (time.perf_counter() - after):.1f} tok/s after")
    print(line)


if __name__ == "__main__":
    main()
