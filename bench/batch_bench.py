"""The offline-batch systems of ``tokenfleet bench`` (issue 8's measurements).

``batch``: one fleet (gateway, worker, the arq orchestrator), then in order:

1. ``interactive`` idle: 4 streaming chat clients on the idle fleet (TTFT reference);
2. ``full`` at 64 clients on the same fleet (the throughput reference), unless the run
   already has a ``full`` row at 64 clients;
3. a ``--batch-lines`` batch (mixed ``max_tokens`` as in the mixed workload, greedy,
   ``ignore_eos``) through the Batch API, and, once it is running at full speed, the same
   4 interactive clients again (``interactive+batch``).

The batch's throughput is its output tokens (from its results file) over the time from its
``in_progress_at`` to its ``completed_at``.

``batch-rss``: a null-engine fleet runs a ``--batch-rss-lines`` file (default 100,000)
while the orchestrator's resident memory is sampled from ``/proc``; the row reports its
peak (``VmHWM``) and the RSS at several points of progress, which must stay flat.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.loadgen import ClosedLoop
from bench.metrics import RunResult
from bench.workload import make_requests, split_among_clients

if TYPE_CHECKING:
    from bench.cli import Bench
    from bench.fleet import LocalFleet

log = logging.getLogger("bench")

INTERACTIVE_CLIENTS = 4
INTERACTIVE_PER_CLIENT = 8  # one whole max_tokens cycle each
REFERENCE_CLIENTS = 64
RAMP_FRACTION = 0.03  # interactive clients start once this share of the batch is done
ENDPOINT = "/v1/chat/completions"
QUICK_LINES = 64  # --quick: long enough for the interactive clients to overlap it


def write_batch_file(path: Path, model: str, lines: int, max_tokens_cap: int | None,
                     workload: str = "mixed") -> int:
    """An OpenAI Batch input file of ``lines`` chat requests; returns the bytes written."""
    with path.open("w") as handle:
        for request in make_requests(workload, lines, max_tokens_cap):
            body = {"model": model, "messages": request.messages,
                    "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True}
            handle.write(json.dumps({"custom_id": f"line-{request.index}", "method": "POST",
                                     "url": ENDPOINT, "body": body}) + "\n")
    return path.stat().st_size


def output_tokens(results: Path) -> tuple[int, int]:
    """(completion tokens, lines) of a Batch output file."""
    tokens = count = 0
    with results.open() as handle:
        for raw in handle:
            if raw.strip():
                line = json.loads(raw)
                count += 1
                usage = (line.get("response") or {}).get("body", {}).get("usage") or {}
                tokens += int(usage.get("completion_tokens") or 0)
    return tokens, count


def proc_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in KiB, from ``/proc/<pid>/status``."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class _Progress:
    """Polls a batch in a thread: its latest object, and callbacks on thresholds."""

    def __init__(self, client: Any, batch_id: str, poll_s: float) -> None:
        self.client = client
        self.batch_id = batch_id
        self.poll_s = poll_s
        self.latest: dict[str, Any] = {}

    def done_fraction(self) -> float:
        counts = self.latest.get("request_counts") or {}
        total = counts.get("total") or 0
        return 0.0 if not total else (counts.get("completed", 0) + counts.get("failed", 0)) / total

    def wait(self, on_poll: Any = None) -> dict[str, Any]:
        from batches.client import FINAL

        while True:
            self.latest = self.client.batch(self.batch_id)
            if on_poll is not None:
                on_poll(self)
            if self.latest["status"] in FINAL:
                return self.latest
            time.sleep(self.poll_s)


def _interactive(fleet: LocalFleet, bench: Bench) -> RunResult:
    from bench.http_load import run_async, run_http

    reqs = make_requests(bench.args.workload, INTERACTIVE_CLIENTS * INTERACTIVE_PER_CLIENT,
                         bench.cap)
    load = ClosedLoop(split_among_clients(reqs, INTERACTIVE_CLIENTS))
    return run_async(run_http(fleet.url, bench.settings.model_name, load))


def _has_full_reference(bench: Bench) -> bool:
    return any(row["system"] == "full" and row.get("concurrency") == REFERENCE_CLIENTS
               and row.get("steady_tokens_per_s") for row in bench.runs)


def run_batch(bench: Bench) -> None:
    """The ``batch`` system: see the module docstring."""
    from batches.client import GatewayClient
    from bench.fleet import LocalFleet, cores_used
    from bench.http_load import run_async, run_http

    lines = QUICK_LINES if bench.args.quick else bench.args.batch_lines
    ramp = 0.0 if bench.args.quick else RAMP_FRACTION
    bench.describe("batch", f"{lines} lines through the Batch API (mixed max_tokens, greedy, "
                   "ignore_eos) on a fleet of one gateway, one worker and the orchestrator; "
                   "tok/s = output tokens / (completed_at - in_progress_at)")
    bench.describe("interactive", f"{INTERACTIVE_CLIENTS} streaming chat clients, "
                   f"{INTERACTIVE_PER_CLIENT} requests each: on the idle fleet, then "
                   "(interactive+batch) while the batch runs")
    try:
        fleet = LocalFleet({}, extra_roles=("orchestrator",)).__enter__()
    except Exception as exc:
        bench.failed("batch", (None, None), exc)
        return
    workdir = Path(tempfile.mkdtemp(prefix="tokenfleet-bench-batch-"))
    client = GatewayClient(fleet.url, None)
    try:
        warm = ClosedLoop(split_among_clients(make_requests("uniform", 2, 8), 2))
        run_async(run_http(fleet.url, bench.settings.model_name, warm))
        bench.record("interactive", (INTERACTIVE_CLIENTS, None), _interactive(fleet, bench),
                     note="idle fleet")
        if not bench.args.quick and not _has_full_reference(bench):
            load = bench.load(REFERENCE_CLIENTS, None)
            before = fleet.cpu_seconds()
            result = run_async(run_http(fleet.url, bench.settings.model_name, load,
                                        redis_url=fleet.redis_url, prefix=fleet.prefix))
            result.cpu_cores = cores_used(before, fleet.cpu_seconds(), result.wall_s)
            bench.record("full", (REFERENCE_CLIENTS, None), result,
                         note="reference for the batch, same fleet")

        path = workdir / "batch.jsonl"
        write_batch_file(path, bench.settings.model_name, lines, bench.cap, bench.args.workload)
        upload = client.upload(path)
        batch = client.create_batch(upload["id"], ENDPOINT)
        progress = _Progress(client, batch["id"], 0.5)
        during: list[RunResult] = []

        def maybe_start_interactive(p: _Progress) -> None:
            if not during and p.latest.get("status") == "in_progress" \
                    and p.done_fraction() >= ramp:
                during.append(RunResult([], 0.0))  # placeholder: start once
                thread = threading.Thread(target=lambda: during.__setitem__(
                    0, _interactive(fleet, bench)), daemon=True)
                thread.start()
                threads.append(thread)

        threads: list[threading.Thread] = []
        final = progress.wait(maybe_start_interactive)
        for thread in threads:
            thread.join()
        if final["status"] != "completed" or not final.get("output_file_id"):
            raise RuntimeError(f"batch ended {final['status']}: {final.get('errors')}")
        results = workdir / "results.jsonl"
        client.download(final["output_file_id"], results)
        tokens, done = output_tokens(results)
        span = float(final["completed_at"]) - float(final["in_progress_at"])
        counts = final.get("request_counts") or {}
        bench.runs.append({
            "system": "batch", "concurrency": None, "rate": None, "requests": done,
            "errors": counts.get("failed", 0), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / span, 1) if span > 0 else None,
            "steady_tokens_per_s": round(tokens / span, 1) if span > 0 else None,
            "requests_per_s": round(done / span, 2) if span > 0 else None,
            "wall_s": span, "note": f"{lines}-line batch; interactive clients ran during it"})
        log.warning("batch     %d lines  %8.1f tok/s  (%d tokens in %.0f s)", lines,
                    tokens / span if span > 0 else 0, tokens, span)
        if during and during[0].records:
            bench.record("interactive+batch", (INTERACTIVE_CLIENTS, None), during[0],
                         note="while the batch runs")
        else:
            bench.failed("interactive+batch", (INTERACTIVE_CLIENTS, None),
                         RuntimeError("the batch ended before the interactive clients began"))
    except Exception as exc:
        bench.failed("batch", (None, None), exc)
    finally:
        client.close()
        fleet.__exit__(None, None, None)


def run_batch_rss(bench: Bench) -> None:
    """The ``batch-rss`` system: the orchestrator's memory over a long null-engine batch."""
    from batches.client import GatewayClient
    from bench.fleet import LocalFleet

    lines = 2000 if bench.args.quick else bench.args.batch_rss_lines
    env = {"TOKENFLEET_ENGINE": "null", "TOKENFLEET_NULL_ENGINE_TOKENS": "4",
           "TOKENFLEET_MAX_BATCH_SIZE": "256", "TOKENFLEET_COALESCE_MS": "2"}
    bench.describe("batch-rss", f"{lines}-line batch on a null-engine fleet (4 dummy tokens per "
                   "line); the orchestrator's RSS sampled every 0.5 s from /proc")
    try:
        fleet = LocalFleet(env, extra_roles=("orchestrator",)).__enter__()
    except Exception as exc:
        bench.failed("batch-rss", (None, None), exc)
        return
    workdir = Path(tempfile.mkdtemp(prefix="tokenfleet-bench-batch-rss-"))
    client = GatewayClient(fleet.url, None, timeout_s=300.0)
    try:
        pid = fleet.pid("orchestrator")
        if pid is None:
            raise RuntimeError("the orchestrator process is not running")
        path = workdir / "batch.jsonl"
        size = write_batch_file(path, bench.settings.model_name, lines, 4, "uniform")
        upload = client.upload(path)
        start_kib = proc_memory_kib(pid).get("VmRSS", 0)
        batch = client.create_batch(upload["id"], ENDPOINT)
        progress = _Progress(client, batch["id"], 0.5)
        marks = (0.01, 0.1, 0.25, 0.5, 0.75, 0.99)
        at_mark: dict[str, int] = {}

        def sample(p: _Progress) -> None:
            rss = proc_memory_kib(pid).get("VmRSS", 0)
            fraction = p.done_fraction()
            for mark in marks:
                if fraction >= mark and f"{mark:g}" not in at_mark:
                    at_mark[f"{mark:g}"] = rss

        final = progress.wait(sample)
        memory = proc_memory_kib(pid)
        counts = final.get("request_counts") or {}
        span = float(final.get("completed_at") or time.time()) - \
            float(final.get("in_progress_at") or final["created_at"])
        row = {"system": "batch-rss", "concurrency": None, "rate": None,
               "requests": counts.get("completed", 0), "errors": counts.get("failed", 0),
               "requests_per_s": round(counts.get("completed", 0) / span, 1) if span > 0
               else None,
               "orchestrator_rss_start_mib": round(start_kib / 1024, 1),
               "orchestrator_rss_at_progress_mib": {k: round(v / 1024, 1)
                                                    for k, v in at_mark.items()},
               "orchestrator_peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
               "input_file_mib": round(size / 2**20, 1), "wall_s": round(span, 1),
               "note": f"{lines} lines, batch {final['status']}; orchestrator RSS MiB at "
               "progress " + ", ".join(f"{k}: {v / 1024:.1f}" for k, v in at_mark.items())
               + f"; peak {memory.get('VmHWM', 0) / 1024:.1f} MiB"}
        bench.runs.append(row)
        log.warning("batch-rss %d lines %s: peak RSS %.1f MiB, by progress %s", lines,
                    final["status"], memory.get("VmHWM", 0) / 1024, row[
                        "orchestrator_rss_at_progress_mib"])
    except Exception as exc:
        bench.failed("batch-rss", (None, None), exc)
    finally:
        client.close()
        fleet.__exit__(None, None, None)
