"""Time (and optionally profile) the engine's decode step alone, at a few batch sizes.

    flock /tmp/tf-bench.lock nice -n -15 python -m bench.step_profile --batch 1,8,32,64

Loads the served model as the worker does (``TOKENFLEET_*`` settings: dtype, compile, ...),
fills ``B`` cache rows to ``--context`` tokens (the cache's contents do not change the
time) and runs ``--steps`` decode steps per batch size after ``--warmup`` ones. Prints wall
and process CPU milliseconds per step (best and median; CPU time is what other processes
on a shared machine cannot inflate as much), and with ``--profile`` the top operators of
``torch.profiler`` grouped by name.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from shared.settings import Settings
from worker.engine.model_runner import TransformerRunner


def build_runner(settings: Settings) -> TransformerRunner:
    from worker.engine.factory import load_runner
    from worker.model_store import resolve_model_path

    _, runner, took = load_runner(settings, Path(resolve_model_path(settings)))
    if took is not None:
        print(f"compiled decode warm-up {took:.1f} s")
    return runner


def fill_rows(runner: TransformerRunner, batch: int, context: int, steps: int) -> None:
    cache = runner.cache
    for seq_id in list(cache._row_of):
        cache.free(seq_id)
    for b in range(batch):
        cache.allocate(f"r{b}")
        cache.advance(f"r{b}", context)
    cache.ensure_capacity(batch, context + steps + 1)


def time_steps(
    runner: TransformerRunner, batch: int, context: int, steps: int, warmup: int,
    mixed: bool = False,
) -> tuple[list[float], list[float]]:
    """``mixed``: rows at the mixed workload's lengths (``bench.decode_attention``), at most
    ``context``; else rows of a few lengths just under ``context``."""
    fill_rows(runner, batch, context, warmup + steps)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, runner.vocab_size, (warmup + steps, batch), generator=gen).tolist()
    if mixed:
        from bench.decode_attention import mixed_lengths

        start = mixed_lengths(batch, context, gen).tolist()
    else:
        start = [context - 8 * (b % 4) for b in range(batch)]
    walls, cpus = [], []
    for i in range(warmup + steps):
        pos = [s + i for s in start]
        t0, c0 = time.perf_counter(), time.process_time()
        runner.decode(ids[i], pos)
        if i >= warmup:
            walls.append((time.perf_counter() - t0) * 1e3)
            cpus.append((time.process_time() - c0) * 1e3)
    return walls, cpus


def profile_steps(
    runner: TransformerRunner, batch: int, context: int, steps: int, top: int
) -> None:
    from torch.profiler import ProfilerActivity, profile

    fill_rows(runner, batch, context, steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            runner.decode([1] * batch, [context + i] * batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def _set_packing(
    runner: TransformerRunner,
    saved: list[tuple[object, ...]] | None,
) -> list[tuple[object, ...]]:
    """Drop the packed weights (``saved`` None; returns them) or put them back."""
    names = ("qkv_packed", "gate_up_packed", "o_packed", "down_packed")
    out = []
    for i, fused in enumerate(runner.fused):
        if fused is None:
            continue
        out.append(tuple(getattr(fused, n) for n in names))
        for n, value in zip(names, saved[i] if saved else [None] * 4, strict=True):
            setattr(fused, n, value)
    out.append((runner.lm_head_packed,))
    runner.lm_head_packed = saved[-1][0] if saved else None
    return out


def compare_packing(runner: TransformerRunner, args: argparse.Namespace) -> None:
    saved = _set_packing(runner, None)
    _set_packing(runner, saved)
    for batch in (int(b) for b in args.batch.split(",")):
        best: dict[str, list[float]] = {"packed": [], "plain": []}
        for _ in range(3):
            for name in ("packed", "plain"):
                if name == "plain":
                    _set_packing(runner, None)
                walls, _ = time_steps(runner, batch, args.context, args.steps, args.warmup)
                best[name].append(min(walls))
                _set_packing(runner, saved)
        _print_rounds(batch, best)


def _print_rounds(batch: int, best: dict[str, list[float]]) -> None:
    """One line per batch: each variant's best step and its rounds (an interleaved A/B)."""
    print(
        f"batch {batch:3d}: "
        + " | ".join(
            f"{k} best {min(v):7.2f} ms (rounds {', '.join(f'{x:.1f}' for x in v)})"
            for k, v in best.items()
        )
        + f" | load {os.getloadavg()[0]:.2f}"
    )


def _interleave(runner: TransformerRunner, args: argparse.Namespace, attr: str,
                names: tuple[str, str], mixed: bool) -> None:
    """Step times with ``runner.<attr>`` None (``names[0]``) and as built (``names[1]``),
    interleaved in one process (controls for the machine), three rounds per batch."""
    built = getattr(runner, attr)
    for batch in (int(b) for b in args.batch.split(",")):
        best: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(3):
            for name in names:
                setattr(runner, attr, built if name == names[1] else None)
                walls, _ = time_steps(runner, batch, args.context, args.steps, args.warmup,
                                      mixed=mixed)
                best[name].append(min(walls))
        setattr(runner, attr, built)
        _print_rounds(batch, best)


def compare_compiled(runner: TransformerRunner, args: argparse.Namespace) -> None:
    """Eager and compiled decode, interleaved in one process (controls for the machine)."""
    if runner.compiled is None:
        raise SystemExit("--ab-compile needs TOKENFLEET_COMPILE=decode")
    _interleave(runner, args, "compiled", ("eager", "compiled"), args.mixed)


def compare_attention(runner: TransformerRunner, args: argparse.Namespace) -> None:
    """torch and native decode attention, interleaved in one process, rows at the mixed
    workload's lengths (``TOKENFLEET_ATTENTION=native`` must have loaded the kernel)."""
    if runner.native is None:
        raise SystemExit("--ab-attention needs TOKENFLEET_ATTENTION=native (and a compiler)")
    if runner.compiled is not None:  # its graph was built with the kernel; it stays there
        raise SystemExit("--ab-attention compares eager steps: TOKENFLEET_COMPILE=off")
    _interleave(runner, args, "native", ("torch", "native"), True)


def compare_pointwise(runner: TransformerRunner, args: argparse.Namespace) -> None:
    """torch's pointwise operations and the native kernels (``native_pointwise``),
    interleaved in one process, rows at the mixed workload's lengths."""
    if runner.pointwise is None:
        raise SystemExit("--ab-pointwise needs TOKENFLEET_POINTWISE=native or auto (and a "
                         "compiler)")
    _interleave(runner, args, "pointwise", ("torch", "native"), True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8,32,64")
    parser.add_argument("--context", type=int, default=160)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--ab",
        action="store_true",
        help="alternate packed and plain weights (same process, interleaved)",
    )
    parser.add_argument(
        "--ab-compile",
        action="store_true",
        help="alternate eager and compiled decode (TOKENFLEET_COMPILE=decode; interleaved)",
    )
    parser.add_argument(
        "--ab-attention",
        action="store_true",
        help="alternate torch and native attention (TOKENFLEET_ATTENTION=native; rows at "
        "the mixed workload's lengths up to --context)",
    )
    parser.add_argument(
        "--ab-pointwise",
        action="store_true",
        help="alternate torch's pointwise operations and the native kernels (norms, rotary, "
        "residual sums, activation; rows at the mixed workload's lengths up to --context)",
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="--ab-compile with rows at the mixed workload's lengths up to --context",
    )
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    settings = Settings()
    t0 = time.perf_counter()
    runner = build_runner(settings)
    print(
        f"dtype {runner.dtype}, compile {getattr(settings, 'compile', 'n/a')}, threads "
        f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, "
        f"runner built in {time.perf_counter() - t0:.1f} s"
    )
    if args.ab:
        return compare_packing(runner, args)
    if args.ab_compile:
        return compare_compiled(runner, args)
    if args.ab_attention:
        return compare_attention(runner, args)
    if args.ab_pointwise:
        return compare_pointwise(runner, args)
    for batch in (int(b) for b in args.batch.split(",")):
        t0 = time.perf_counter()
        walls, cpus = time_steps(runner, batch, args.context, args.steps, args.warmup)
        first = time.perf_counter() - t0
        print(
            f"batch {batch:3d}: wall best {min(walls):7.2f} ms  median "
            f"{statistics.median(walls):7.2f} ms | cpu best {min(cpus):7.2f} ms  median "
            f"{statistics.median(cpus):7.2f} ms | incl. warm-up {first:.1f} s "
            f"| load {os.getloadavg()[0]:.2f}"
        )
        if args.profile:
            profile_steps(runner, batch, args.context, args.steps, args.top)


if __name__ == "__main__":
    main()
