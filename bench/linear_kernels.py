"""fp32 matmuls of a decode step, one kernel against another: ``python -m bench.linear_kernels``.

Runs SmolLM2-135M's projection shapes (30 layers of qkv, o_proj, gate_up, down_proj, each
layer its own random weights so they stream from memory as a real step's do, and the tied
head) at a few row counts through torch's kernels (oneDNN's packed matmul, ``packed.py``,
and MKL's ``F.linear``) and the native kernel (``worker/engine/native_linear.py``),
interleaved, and prints ms per pass, GB/s of weights and GFLOP/s. The runner pads 1-3 rows
to 4 for torch's kernels (``model_runner._apply``), so the ``4`` row is what a lone
request pays there.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker.engine import native_linear
from worker.engine.loader import torch_cpu_capability
from worker.engine.packed import pack_linear

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536, vocab 49152
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD_SHAPE = (49152, 576)


def _best(fn: Callable[[], None], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,32,64")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    kernel = native_linear.load()
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=gen) * 0.02
               for _ in range(args.layers) for shape in LAYER_SHAPES]
    weights.append(torch.randn(*HEAD_SHAPE, generator=gen) * 0.02)
    onednn = [pack_linear(w) for w in weights]
    panels = [native_linear.pack(w) for w in weights]
    nbytes = sum(w.numel() * 4 for w in weights)
    print(f"torch {torch.__version__}, CPU capability {torch_cpu_capability()}, threads "
          f"{torch.get_num_threads()}, fp32, {nbytes / 1e6:.0f} MB of weights a pass, "
          f"oneDNN packed: {sum(p is not None for p in onednn)}/{len(weights)}")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k, generator=gen) for k in {w.shape[1] for w in weights}}

        def run_native(xs: dict[int, torch.Tensor] = xs) -> None:
            for w, p in zip(weights, panels, strict=True):
                kernel.linear(xs[w.shape[1]], p)

        def run_torch(xs: dict[int, torch.Tensor] = xs) -> None:
            for w, p in zip(weights, onednn, strict=True):
                x = xs[w.shape[1]]
                if p is not None:
                    p(x)
                else:
                    F.linear(x, w)

        results: dict[str, list[float]] = {"native": [], "torch": []}
        for _ in range(2):  # interleaved: the machine's noise hits both alike
            results["native"].append(_best(run_native, args.rounds))
            results["torch"].append(_best(run_torch, args.rounds))
        line = [f"rows {rows:3d}"]
        for name, times in results.items():
            ms = min(times)
            line.append(f"{name} {ms:7.1f} ms {nbytes / ms / 1e6:5.1f} GB/s "
                        f"{2 * rows * nbytes / 4 / ms / 1e6:6.1f} GFLOP/s")
        line.append(f"native/torch time {min(results['native']) / min(results['torch']):.2f}")
        print(" | ".join(line))


if __name__ == "__main__":
    main()
