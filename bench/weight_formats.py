"""One projection's matmul in every weight format this CPU could serve (issue 15, part 3).

``python -m bench.weight_formats [--rows 1,8,32,64] [--repeats 30]`` times ``x @ W.T`` at
SmolLM2-135M's four projection shapes (fused q/k/v, fused gate/up, down, the tied lm_head)
for each format, median microseconds of ``--repeats`` calls after three warm-up ones:

- ``fp32``: ``F.linear`` in float32 (what an AVX2-only machine serves);
- ``bf16``: ``F.linear`` in bfloat16, and ``bf16-packed``: the oneDNN pre-packed weight the
  runner uses (``worker/engine/packed.py``; only where bf16 is native);
- ``int8-torch``: the runner's weight-only int8 (``worker/engine/weight_int8.py``);
- ``ao-int8wo`` / ``ao-da8w8``: torchao's int8 weight-only and dynamic int8 activation x int8
  weight configs (eager, bf16 activations), when ``torchao`` is installed;
- ``bnb-int8`` / ``bnb-nf4``: bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` (bf16 compute),
  when it is installed.

``--streamed`` instead times one pass over ``--layers`` (30) distinct sets of a layer's four
projections (q/k/v, o, gate/up, down), so every weight comes from memory as in a decode
step: fp32 ``F.linear`` (MKL) against fp32 and bf16 packed for oneDNN, at 1 and 4 rows, in
ms and GB/s of weights read.

A format that cannot run here reports why instead of a time. Weights are random: a matmul's
time does not depend on its values. The weights are re-read from memory at every call only
for the lm_head (56 MB in bf16); the smaller ones partly stay in the CPU's caches, so read
their absolute times as a lower bound and compare formats row by row.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.machine import cpu_model

SHAPES = {"qkv": (960, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}  # (out_features, in_features)


def _time_us(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def _formats(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor] | str]:
    """Each format's ``fn(x)`` (x in the format's activation dtype), or why it cannot run."""
    from worker.engine.model_runner import _apply
    from worker.engine.packed import pack_linear
    from worker.engine.weight_int8 import Int8Linear, quantize_rows

    bf16 = weight.to(torch.bfloat16)
    out: dict[str, Callable[[torch.Tensor], torch.Tensor] | str] = {
        "fp32": lambda x: F.linear(x.float(), weight),
        "bf16": lambda x: F.linear(x, bf16),
    }
    packed = pack_linear(bf16, None)
    out["bf16-packed"] = ((lambda x: _apply(packed, x)) if packed is not None
                          else "not packed (no native bf16 matmul here)")
    q, scale = quantize_rows(weight, torch.bfloat16)
    out["int8-torch"] = Int8Linear(q, scale, None)
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                 dtype=torch.bfloat16)
        linear.weight.data.copy_(bf16)
        for name, config in (("ao-int8wo", Int8WeightOnlyConfig()),
                             ("ao-da8w8", Int8DynamicActivationInt8WeightConfig())):
            module = copy.deepcopy(linear)
            quantize_(module, config)
            out[name] = module
    except Exception as exc:
        out["ao-int8wo"] = out["ao-da8w8"] = f"torchao unavailable: {type(exc).__name__}"
    try:
        import bitsandbytes as bnb
        int8 = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False,
                                   has_fp16_weights=False)
        int8.weight = bnb.nn.Int8Params(bf16.float(), requires_grad=False,
                                        has_fp16_weights=False)
        nf4 = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False,
                                compute_dtype=torch.bfloat16, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(bf16, requires_grad=False, quant_type="nf4")
        out["bnb-int8"], out["bnb-nf4"] = int8.cpu(), nf4.cpu()
    except Exception as exc:
        out["bnb-int8"] = out["bnb-nf4"] = f"bitsandbytes unavailable: {type(exc).__name__}"
    return out


def measure(rows: list[int], repeats: int) -> list[dict[str, object]]:
    torch.manual_seed(0)
    results: list[dict[str, object]] = []
    for shape_name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features) * in_features**-0.5
        formats = _formats(weight)
        for m in rows:
            x = torch.randn(m, in_features, dtype=torch.bfloat16)
            row: dict[str, object] = {"shape": shape_name, "rows": m}
            for name, fn in formats.items():
                if isinstance(fn, str):
                    row[name] = fn
                    continue
                try:
                    row[name] = _time_us(fn, x, repeats)
                except Exception as exc:
                    row[name] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
            results.append(row)
    return results


LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))


def measure_streamed(layers: int, rows: list[int], repeats: int = 5) -> list[dict[str, object]]:
    """Best-of-``repeats`` ms for one pass over ``layers`` distinct projection sets."""
    from worker.engine.packed import pack_linear

    torch.manual_seed(0)
    weights = [torch.randn(o, i) * i**-0.5 for _ in range(layers) for (o, i) in LAYER_SHAPES]
    nbytes = {torch.float32: sum(w.numel() * 4 for w in weights)}
    nbytes[torch.bfloat16] = nbytes[torch.float32] // 2
    fns: dict[str, tuple[torch.dtype, list[Callable[[torch.Tensor], torch.Tensor]] | str]] = {
        "fp32 F.linear (MKL)": (torch.float32,
                                [lambda x, w=w: F.linear(x, w) for w in weights])}
    for dtype, name in ((torch.float32, "fp32 packed (oneDNN)"),
                        (torch.bfloat16, "bf16 packed (oneDNN)")):
        packed = [pack_linear(w.to(dtype)) for w in weights]
        fns[name] = (dtype, [p for p in packed if p is not None] if all(packed)
                     else "not packed here")
    results: list[dict[str, object]] = []
    with torch.inference_mode():
        for name, (dtype, calls) in fns.items():
            for m in rows:
                row: dict[str, object] = {"format": name, "rows": m}
                if isinstance(calls, str):
                    row["ms"] = calls
                    results.append(row)
                    continue
                xs = {i: torch.randn(m, i, dtype=dtype) for i in {s[1] for s in LAYER_SHAPES}}
                ins = [xs[w.shape[1]] for w in weights]
                best = float("inf")
                for attempt in range(repeats + 1):
                    start = time.perf_counter()
                    for fn, x in zip(calls, ins, strict=True):
                        fn(x)
                    if attempt:  # the first pass warms up
                        best = min(best, time.perf_counter() - start)
                row["ms"] = round(best * 1e3, 2)
                row["GB/s"] = round(nbytes[dtype] / best / 1e9, 1)
                results.append(row)
    return results


def markdown(results: list[dict[str, object]]) -> str:
    names = [k for k in results[0] if k not in ("shape", "rows")]
    lines = ["| shape | rows | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in results:
        cells = [f"{row[n]:,.0f}" if isinstance(row[n], float) else "n/a" for n in names]
        lines.append(f"| {row['shape']} | {row['rows']} | " + " | ".join(cells) + " |")
    reasons = sorted({f"{n}: {row[n]}" for row in results for n in names
                      if isinstance(row[n], str)})
    return "\n".join(lines + [f"- {r}" for r in reasons])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,64")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    parser.add_argument("--streamed", action="store_true",
                        help="one pass over --layers distinct layers' projections instead")
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.streamed:
        rows = measure_streamed(args.layers, [int(r) for r in args.rows.split(",")])
        print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads; {args.layers} layers' projections, best of 5 passes")
        print("| format | rows | ms | GB/s |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['format']} | {r['rows']} | {r['ms']} | {r.get('GB/s', 'n/a')} |")
        return
    results = measure([int(r) for r in args.rows.split(",")], args.repeats)
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "results": results}, indent=1))
        return
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "median µs per call")
    print(markdown(results))


if __name__ == "__main__":
    main()
