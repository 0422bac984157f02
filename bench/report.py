"""Bench results: JSON file, Markdown table (appended to docs/benchmarks.md), PNG plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

COLUMNS = [
    ("system", "system"), ("concurrency", "conc."), ("output_tokens_per_s", "out tok/s"),
    ("steady_tokens_per_s", "steady tok/s"),
    ("requests_per_s", "req/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
    ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms"), ("e2e_p50_ms", "e2e p50 ms"),
    ("e2e_p99_ms", "e2e p99 ms"), ("mean_batch", "mean batch"), ("requests", "reqs"),
    ("errors", "errors"),
]


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "commit": commit}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"### {meta['date']} — workload `{meta['workload']}`, {meta['mode']} loop, "
        f"{meta['model']} {meta['dtype']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']['cpus']} CPUs ({meta['machine']['cpu']}), commit "
        f"`{meta['machine']['commit']}`; bf16 matmul measured at "
        f"{meta['matmul_gflops']:.0f} GFLOP/s; model parameters {meta['parameters']:,}.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in result["runs"]:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    for row in result["runs"]:
        if row.get("note"):
            lines.append(f"\n- `{row['system']}` at {row['concurrency']}: {row['note']}")
    if result.get("targets"):
        lines += ["", "| target | steady state | whole run | goal | met (steady) |",
                  "|---|---|---|---|---|"]
        for t in result["targets"]:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['name']} | {_cell(t['value'])} | {_cell(t.get('whole_run'))} "
                         f"| {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: Path, append_to: Path | None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["meta"]["date"].replace(":", "").replace(" ", "T")
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    (out_dir / f"bench-{stamp}.md").write_text(markdown(result))
    plot(result, out_dir / f"bench-{stamp}.png")
    if append_to is not None:
        with append_to.open("a") as fh:
            fh.write("\n" + markdown(result))
    return path


def plot(result: dict[str, Any], path: Path) -> bool:
    """Throughput and p99 TTFT against concurrency, one line per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    systems: dict[str, list[dict[str, Any]]] = {}
    for row in result["runs"]:
        if row.get("output_tokens_per_s") is not None and row["system"] != "bus":
            systems.setdefault(row["system"], []).append(row)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in systems.items():
        rows.sort(key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        left.plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", label=name)
        right.plot(xs, [r["ttft_p99_ms"] or 0 for r in rows], marker="o", label=name)
    for ax, title in ((left, "output tokens/s"), (right, "p99 TTFT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"{result['meta']['model']} {result['meta']['dtype']}, "
                 f"{result['meta']['workload']} workload")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
