"""Bench results: a JSON file, a Markdown table (appended to docs/benchmarks.md) and a plot.

Every figure in the report comes from the result dict of this run; nothing is filled in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.machine import capability_text
from bench.plot import plot, plot_policies

COLUMNS = [
    ("system", "system"), ("concurrency", "conc."), ("output_tokens_per_s", "out tok/s"),
    ("steady_tokens_per_s", "steady tok/s"),
    ("requests_per_s", "req/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
    ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms"), ("e2e_p50_ms", "e2e p50 ms"),
    ("e2e_p99_ms", "e2e p99 ms"), ("mean_batch", "mean batch"), ("requests", "reqs"),
    ("errors", "errors"),
]
METRIC_KEYS = tuple(key for key, _ in COLUMNS[2:])


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def load_label(row: dict[str, Any]) -> str:
    """The ``conc.`` cell: clients (closed loop) or the arrival rate (open loop)."""
    if row.get("rate") is not None:
        return f"{row['rate']:g}/s"
    return _cell(row.get("concurrency"))


def _header(meta: dict[str, Any]) -> list[str]:
    mach = meta["machine"]
    settings = ", ".join(f"{k}={v}" for k, v in (meta.get("settings") or {}).items())
    cap = meta.get("max_tokens_cap")
    foreign = meta.get("foreign_cores")
    noise = ("n/a" if foreign is None else
             f"{foreign:.2f} cores on average (1-min load average at the end "
             f"{meta.get('loadavg_1m_end') or 0:.2f})")
    return [
        f"### Run of {meta['date']} — workload `{meta['workload']}`"
        f"{f' (max_tokens capped at {cap})' if cap else ''}, {meta['mode']} loop, "
        f"{meta['model']} {meta['dtype']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {mach['cpus']} CPUs ({mach['cpu']}), commit `{mach['commit']}`.  ",
        f"CPU: {capability_text(mach)}; native bf16 "
        f"{'yes' if mach.get('cpu_bf16') else 'no'}.  ",
        f"{_yardstick(meta)}; model parameters {meta['parameters']:,}.  ",
        f"Settings: {settings or 'n/a'}.  ",
        f"Other processes on the machine during the run: {noise}.",
    ]


def _yardstick(meta: dict[str, Any]) -> str:
    if not meta.get("matmul_gflops"):
        return "Yardstick: not measured (no in-process system ran)"
    return (f"Yardstick: {meta.get('matmul_dtype') or meta['dtype']} matmul measured at "
            f"{meta['matmul_gflops']:.0f} GFLOP/s")


def _cpu_table(runs: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in runs if r.get("cpu_cores")]
    if not rows:
        return []
    names = sorted({n for r in rows for n in r["cpu_cores"]}, key=lambda n: (n != "loadgen", n))
    lines = ["", "CPU cores used per process (CPU-seconds per wall second; 2 = both cores):",
             "", "| system | conc. | " + " | ".join(names) + " |",
             "|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [_cell(r["cpu_cores"].get(n)) for n in names]
        lines.append(f"| {r['system']} | {load_label(r)} | " + " | ".join(cells) + " |")
    return lines


def _targets(targets: list[dict[str, Any]]) -> list[str]:
    if not targets:
        return []
    lines = ["", "| target | steady state | whole run | goal | met (steady) |",
             "|---|---|---|---|---|"]
    for t in targets:
        met = "n/a (did not run)" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {_cell(t['value'])} | {_cell(t.get('whole_run'))} "
                     f"| {t['goal']} | {met} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [*_header(meta), "", "| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in result["runs"]:
        cells = [row["system"], load_label(row)] + [_cell(row.get(k)) for k in METRIC_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    present = {row["system"] for row in result["runs"]}
    notes = [f"- `{name}`: {text}" for name, text in (meta.get("system_notes") or {}).items()
             if name in present]
    notes += [f"- `{row['system']}` at {load_label(row)}: {row['note']}"
              for row in result["runs"] if row.get("note")]
    if notes:
        lines += ["", *notes]
    lines += _cpu_table(result["runs"])
    if meta.get("quantization_table"):
        lines += ["", "Quantization modes (`quant`):", "", meta["quantization_table"]]
    lines += _targets(result.get("targets") or [])
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: Path, append_to: Path | None) -> Path:
    """``<out>/bench-<time>.json``, ``.md`` and ``.png`` (and ``-scheduling.png`` when the
    run compared scheduling policies); the Markdown appended to ``append_to`` too when
    given. Returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["meta"]["date"].replace(":", "").replace(" ", "T")
    path = out_dir / f"bench-{stamp}.json"
    png = out_dir / f"bench-{stamp}.png"
    result["meta"]["plot"] = str(png) if plot(result, png) else None
    policies_png = out_dir / f"bench-{stamp}-scheduling.png"
    result["meta"]["scheduling_plot"] = (str(policies_png) if plot_policies(result, policies_png)
                                         else None)
    path.write_text(json.dumps(result, indent=2))
    (out_dir / f"bench-{stamp}.md").write_text(markdown(result))
    if append_to is not None:
        with append_to.open("a") as fh:
            fh.write("\n" + markdown(result))
    return path
