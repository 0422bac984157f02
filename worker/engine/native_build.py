"""Build a small C kernel once per machine and cache the shared library (ctypes loads it).

Used by the native kernels (``native_attention.py``, ``native_linear.py``): each passes its
source and flags; the library is compiled with the C compiler on PATH (``$CC``, ``cc`` or
``gcc``) into ``~/.cache/tokenfleet/native/NAME-<hash>.so``, keyed by source, compiler, flags
and the CPU's flags (``-march=native`` code must not move to another CPU kind).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

# e^x of LANES floats already clamped to [-87, 88] (the caller clamps as it needs): Cephes'
# expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial for e^r, 2^n added to the
# exponent bits), ~1 ulp like libm's expf. Needs the vector types vf (float) and vi (int32)
# of LANES lanes; the kernels put it in their source at "@EXP_CLAMPED@".
EXP_CLAMPED_C = r"""
static inline vf exp_clamped(vf x) {
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round(x log2 e) */
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf y = p * (r * r) + r + 1.0f;
    vi bits = (vi)y + (__builtin_convertvector(n, vi) << 23);
    return (vf)bits;
}
"""


class NativeBuildError(RuntimeError):
    """The kernel cannot be built here; the message says why."""


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tokenfleet" / "native"


def cpu_flags() -> str:
    """The ``flags`` line of /proc/cpuinfo (or the platform's processor name)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build(name: str, source: str, flags: list[str], cache_dir: Path | None = None,
          error: type[NativeBuildError] = NativeBuildError) -> Path:
    """The shared library of ``source``, compiled once and cached; raises ``error`` (no
    compiler, or it failed: the message has its last words)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise error("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256("\0".join([source, compiler, *flags, cpu_flags()]).encode())
    out_dir = cache_dir or default_cache_dir()
    lib = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src, built = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        try:
            proc = subprocess.run([compiler, *flags, str(src), "-o", str(built), "-lm"],
                                  capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise error(f"cannot run {compiler}: {exc}") from exc
        if proc.returncode != 0:
            raise error(f"{compiler} failed: {proc.stderr.strip()[-500:]}")
        built.replace(lib)  # atomic: a concurrent worker finds a whole file or none
    return lib


def open_library(path: Path, error: type[NativeBuildError] = NativeBuildError) -> ctypes.CDLL:
    """``ctypes.CDLL(path)`` (its calls release the GIL); raises ``error``."""
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise error(f"cannot load {path}: {exc}") from exc
