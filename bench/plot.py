"""The bench plots: output tokens/s and p99 TTFT against concurrency (closed loop) or the
arrival rate (open loop), one line per system; and, when a run compares scheduling policies
(rows ``engine[mixed]``, ``engine[phase]``...), tokens/s, TTFT and inter-token latency
(p50 and p99) per policy. matplotlib (the ``bench`` extra), Agg."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def base_system(name: str) -> str:
    """``engine[phase]`` -> ``engine``."""
    return name.split("[", 1)[0]


def policy_rows(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The rows of policy comparisons (``engine[mixed]``...) that measured something, by
    row name, sorted by load (clients or rate)."""
    x_key = "rate" if result["meta"].get("mode") == "open" else "concurrency"
    out: dict[str, list[dict[str, Any]]] = {}
    for row in result["runs"]:
        if ("[" in row["system"] and row.get("output_tokens_per_s") is not None
                and row.get(x_key) is not None):
            out.setdefault(row["system"], []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: r[x_key])
    return out


def plot_policies(result: dict[str, Any], path: Path) -> bool:
    """The scheduling comparison: tokens/s, TTFT p50/p99, ITL p50/p99 per policy row.
    False (and no file) when matplotlib is missing or the run compared no policies."""
    systems = policy_rows(result)
    if not systems:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    meta = result["meta"]
    is_open = meta.get("mode") == "open"
    x_key = "rate" if is_open else "concurrency"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = ((axes[0], "output tokens/s", ("output_tokens_per_s",)),
              (axes[1], "TTFT (ms): p99 solid, p50 dashed", ("ttft_p99_ms", "ttft_p50_ms")),
              (axes[2], "inter-token latency (ms): p99 solid, p50 dashed",
               ("itl_p99_ms", "itl_p50_ms")))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rows) in enumerate(sorted(systems.items())):
        color = colors[i % len(colors)]
        for ax, _, keys in panels:
            for key, style in zip(keys, ("-o", "--s"), strict=False):
                points = [(r[x_key], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot([x for x, _ in points], [y for _, y in points], style,
                            color=color, label=name if style == "-o" else None)
    for ax, title, _ in panels:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("arrival rate (requests/s)" if is_open else "concurrent clients")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"scheduling policies: {meta['model']} {meta['dtype']}, {meta['workload']} "
                 f"workload, {meta['mode']} loop ({meta['machine']['cpus']} CPUs, "
                 f"{meta['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(result: dict[str, Any], path: Path) -> bool:
    """Write the PNG; False (and no file) when matplotlib is missing or nothing ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    is_open = result["meta"].get("mode") == "open"
    x_key = "rate" if is_open else "concurrency"
    systems: dict[str, list[dict[str, Any]]] = {}
    for row in result["runs"]:
        if (row.get("output_tokens_per_s") is not None and not row["system"].startswith("bus")
                and row.get(x_key) is not None):
            systems.setdefault(row["system"], []).append(row)
    if not systems:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in systems.items():
        rows.sort(key=lambda r: r[x_key])
        xs = [r[x_key] for r in rows]
        style = "-o" if base_system(name) in ("engine", "full") else "--s"
        left.plot(xs, [r["output_tokens_per_s"] for r in rows], style, label=name)
        ttft = [(x, r["ttft_p99_ms"]) for x, r in zip(xs, rows, strict=True)
                if r.get("ttft_p99_ms")]
        if ttft:
            right.plot([x for x, _ in ttft], [y for _, y in ttft], style, label=name)
    for ax, title in ((left, "output tokens/s"), (right, "p99 TTFT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("arrival rate (requests/s)" if is_open else "concurrent clients")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"{meta['model']} {meta['dtype']}, {meta['workload']} workload, "
                 f"{meta['mode']} loop ({meta['machine']['cpus']} CPUs, {meta['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
