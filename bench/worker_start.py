"""Seconds from process start to a warm engine, as a worker builds it (``TOKENFLEET_*``).

    TOKENFLEET_COMPILE=decode python -m bench.worker_start

Prints when the weights were loaded and when the warm-up (compiled graphs included) ended,
both counted from before the engine's imports.
"""

from __future__ import annotations

import time


def main() -> None:
    start = time.perf_counter()
    from shared.settings import Settings
    from worker.engine.factory import build_engine

    marks: dict[str, float] = {}
    build_engine(Settings(), on_stage=lambda s: marks.__setitem__(s, time.perf_counter() - start))
    print(f"weights {marks['weights']:.1f} s, warm engine {marks['warmup']:.1f} s")


if __name__ == "__main__":
    main()
