"""The bench plot: output tokens/s and p99 TTFT against concurrency (closed loop) or the
arrival rate (open loop), one line per system. matplotlib (the ``bench`` extra), Agg."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
        style = "-o" if name in ("engine", "full") else "--s"
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
