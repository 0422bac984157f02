"""The bench records what the CPU can do, and measures its yardstick in the engine's dtype."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench.inprocess import matmul_flops
from bench.machine import CAPABILITY_FLAGS, capability_text, machine
from bench.report import markdown
from worker.engine.loader import cpu_has_bf16

REPO = Path(__file__).resolve().parents[2]


def test_every_result_records_the_cpu_capability() -> None:
    mach = machine()
    assert set(mach["cpu_flags"]) == set(CAPABILITY_FLAGS.values())
    assert mach["cpu_bf16"] == cpu_has_bf16()
    assert mach["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if mach["cpu_bf16"]:
        assert mach["cpu_flags"]["AVX512-BF16"] or mach["cpu_flags"]["AMX"]


def test_a_cpu_limited_to_avx2_has_no_native_bf16() -> None:
    """The same settings mimic an AVX2-only CPU on a bigger one; ``dtype=auto`` then picks
    float32, and so does the bench's yardstick."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    code = ("from worker.engine.loader import cpu_has_bf16, pick_dtype\n"
            "from shared.settings import Settings\nimport torch\n"
            "print(cpu_has_bf16(), pick_dtype(Settings(dtype='auto'), torch.device('cpu')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert proc.stdout.split() == ["False", "torch.float32"]


def test_the_yardstick_runs_in_the_dtype_it_is_given() -> None:
    assert matmul_flops(torch.float32, torch.device("cpu"), size=64, repeats=1) > 0


def _meta(**machine_extra: Any) -> dict[str, Any]:
    return {"date": "2026-01-01 00:00:00", "workload": "mixed", "mode": "closed", "model": "m",
            "dtype": "float32", "matmul_dtype": "float32", "command": "tokenfleet bench",
            "machine": {"cpus": 2, "cpu": "cpu", "commit": "abc", **machine_extra},
            "matmul_gflops": 55.0, "parameters": 1000}


def test_the_markdown_header_names_the_capability_and_the_yardstick_dtype() -> None:
    flags = {"AVX2": True, "AVX-512": False, "AVX512-BF16": False, "AMX": False}
    text = markdown({"meta": _meta(cpu_flags=flags, torch_cpu_capability="AVX2",
                                   cpu_bf16=False), "runs": [], "targets": []})
    assert "AVX2 yes, AVX-512 no, AVX512-BF16 no, AMX no; torch dispatches to AVX2" in text
    assert "native bf16 no" in text
    assert "Yardstick: float32 matmul measured at 55 GFLOP/s" in text
    assert capability_text({}) == "AVX2 no, AVX-512 no, AVX512-BF16 no, AMX no"
