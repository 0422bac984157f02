"""``tokenfleet enqueue FILE``, ``tokenfleet batch status|results|cancel|list`` and
``tokenfleet orchestrator``; each registered by an ``add_*_parser(subparsers)`` function.

``enqueue`` and ``batch`` talk to a gateway over HTTP (``--url``, default
``TOKENFLEET_URL`` or ``http://127.0.0.1:8000``; key from ``--api-key`` or
``TOKENFLEET_API_KEY``), so they work from any machine that reaches the fleet.
``orchestrator`` runs the arq worker that drives batches (``batches.worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from shared.errors import TokenfleetError

Subparsers = argparse._SubParsersAction  # type: ignore[type-arg]
DEFAULT_URL = "http://127.0.0.1:8000"


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("TOKENFLEET_URL", DEFAULT_URL),
                        help="the gateway (default: TOKENFLEET_URL or %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help="API key (default: TOKENFLEET_API_KEY)")


def _client(args: argparse.Namespace) -> Any:
    from batches.client import GatewayClient

    return GatewayClient(args.url, args.api_key or os.environ.get("TOKENFLEET_API_KEY"))


# --- enqueue --------------------------------------------------------------------------------


def add_enqueue_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "enqueue", help="run a file of requests (OpenAI Batch format) as a batch",
        description="Check every line of FILE (OpenAI Batch input: custom_id, method, url, "
        "body), upload it, create a batch and, with --wait, follow it with a progress bar and "
        "write the results and errors as JSONL.")
    parser.add_argument("file", type=Path, help="requests, one JSON object per line")
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true", default=None,
                      help="follow the batch to the end (default when attached to a terminal)")
    wait.add_argument("--no-wait", dest="wait", action="store_false",
                      help="print the batch id and exit")
    parser.add_argument("--output", type=Path, default=Path("results.jsonl"),
                        help="where --wait writes the results (default: %(default)s)")
    parser.add_argument("--errors", type=Path, default=Path("errors.jsonl"),
                        help="where --wait writes failed requests (default: %(default)s)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    _add_connection_flags(parser)
    parser.set_defaults(func=cmd_enqueue)
    return parser


def cmd_enqueue(args: argparse.Namespace) -> int:
    from batches.client import check_file

    if not args.file.is_file():
        raise TokenfleetError(f"{args.file}: no such file")
    checked = check_file(args.file)
    if checked.errors:
        for error in checked.errors:
            print(f"{args.file}:{error.as_dict()['message']}", file=sys.stderr)
        print(f"{args.file}: nothing was submitted; fix the lines above", file=sys.stderr)
        return 1
    client = _client(args)
    try:
        uploaded = client.upload(args.file)
        batch = client.create_batch(uploaded["id"], checked.endpoint,
                                    {"source": args.file.name})
        wait = sys.stdout.isatty() if args.wait is None else args.wait
        if not wait:
            print(batch["id"])
            return 0
        print(f"batch {batch['id']}: {checked.num_lines} requests", file=sys.stderr)
        final = follow(client, batch["id"], args.poll)
        return _finish(client, final, args.output, args.errors)
    finally:
        client.close()


def follow(client: Any, batch_id: str, poll_s: float) -> dict[str, Any]:
    """Poll to the end with a rich progress bar: done / failed / total, tok/s, ETA."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.fields[status]:<11}"), BarColumn(),
               TextColumn("{task.fields[counts]}"),
               TimeRemainingColumn())
    rate = _Rate()
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("batch", total=None, status="validating", counts="")

        def update(batch: dict[str, Any]) -> None:
            counts = batch["request_counts"]
            tps = rate.update((batch.get("usage") or {}).get("output_tokens", 0))
            done = counts["completed"] + counts["failed"]
            text = (f"{done}/{counts['total']} done, {counts['failed']} failed, "
                    f"{tps:.0f} output tok/s")
            progress.update(task, total=counts["total"] or None, completed=done,
                            status=batch["status"], counts=text)

        return dict(client.wait(batch_id, poll_s, update))


class _Rate:
    """Output tokens per second over the last ~10 s of polls."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []

    def update(self, tokens: int) -> float:
        now = time.monotonic()
        self.samples.append((now, tokens))
        self.samples = [s for s in self.samples if now - s[0] <= 10.0] or self.samples[-1:]
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def _finish(client: Any, batch: dict[str, Any], output: Path, errors: Path) -> int:
    counts = batch["request_counts"]
    print(f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, "
          f"{counts['failed']} failed of {counts['total']}", file=sys.stderr)
    if batch["status"] == "failed" and batch.get("errors"):
        for error in batch["errors"]["data"]:
            print(f"  {error['message']}", file=sys.stderr)
        return 1
    _download(client, batch, output, errors)
    return 0 if batch["status"] == "completed" else 1


def _download(client: Any, batch: dict[str, Any], output: Path, errors: Path) -> None:
    for field, dest in (("output_file_id", output), ("error_file_id", errors)):
        if batch.get(field):
            size = client.download(batch[field], dest)
            print(f"wrote {dest} ({size} bytes)", file=sys.stderr)


# --- batch status|results|cancel|list -------------------------------------------------------


def add_batch_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("batch", help="look at, download or cancel batches",
                                   description="Act on batches created by `tokenfleet "
                                   "enqueue` or the OpenAI Batch API.")
    actions = parser.add_subparsers(dest="batch_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="print a batch as JSON")
    status.add_argument("batch_id")
    status.set_defaults(func=cmd_batch_status)
    results = actions.add_parser("results", help="download a batch's results and errors")
    results.add_argument("batch_id")
    results.add_argument("--output", type=Path, default=Path("results.jsonl"))
    results.add_argument("--errors", type=Path, default=Path("errors.jsonl"))
    results.add_argument("--wait", action="store_true", help="wait for the batch to end first")
    results.set_defaults(func=cmd_batch_results)
    cancel = actions.add_parser("cancel", help="cancel a batch")
    cancel.add_argument("batch_id")
    cancel.set_defaults(func=cmd_batch_cancel)
    listing = actions.add_parser("list", help="your batches, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(func=cmd_batch_list)
    for action in (status, results, cancel, listing):
        _add_connection_flags(action)
    return parser


def cmd_batch_status(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        print(json.dumps(client.batch(args.batch_id), indent=2))
    finally:
        client.close()
    return 0


def cmd_batch_results(args: argparse.Namespace) -> int:
    from batches.client import FINAL

    client = _client(args)
    try:
        batch = client.wait(args.batch_id) if args.wait else client.batch(args.batch_id)
        if batch["status"] not in FINAL:
            raise TokenfleetError(f"batch {args.batch_id} is {batch['status']}; its results "
                                  "exist once it ends (use --wait)")
        return _finish(client, batch, args.output, args.errors)
    finally:
        client.close()


def cmd_batch_cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        batch = client.cancel(args.batch_id)
    finally:
        client.close()
    print(f"batch {batch['id']}: {batch['status']}")
    return 0


def cmd_batch_list(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        batches = client.list_batches(args.limit)
    finally:
        client.close()
    print(f"{'id':<32} {'status':<11} {'done':>7} {'failed':>7} {'total':>7}  created (UTC)")
    for batch in batches:
        counts = batch["request_counts"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(batch["created_at"]))
        print(f"{batch['id']:<32} {batch['status']:<11} {counts['completed']:>7} "
              f"{counts['failed']:>7} {counts['total']:>7}  {created}")
    return 0


# --- orchestrator ---------------------------------------------------------------------------


def add_orchestrator_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "orchestrator", help="run the arq worker that drives batches",
        description="Run the batch orchestrator (an arq worker): validates batches, feeds "
        "their requests into the batch lane, collects results, writes output files. Run one "
        "or more next to the workers; configured by TOKENFLEET_* like the rest.")
    parser.set_defaults(func=cmd_orchestrator)
    return parser


def cmd_orchestrator(args: argparse.Namespace) -> int:
    from batches.worker import run
    from shared.settings import Settings

    return run(Settings())


def add_parsers(subparsers: Subparsers) -> None:
    """All of the above on a ``tokenfleet`` subparsers object."""
    add_enqueue_parser(subparsers)
    add_batch_parser(subparsers)
    add_orchestrator_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    import logging

    from shared.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m batches",
                                     description="tokenfleet offline batches")
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=Settings().log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except TokenfleetError as exc:
        print(f"tokenfleet: error: {exc}", file=sys.stderr)
        return 1
