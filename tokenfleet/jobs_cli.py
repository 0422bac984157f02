"""``tokenfleet jobs submit|status|wait|list|cancel|purge`` (a client of a gateway's jobs
API, ``tokenfleet.client``) and ``tokenfleet webhooks run|secret|dead`` (the dispatcher).

``jobs`` talks HTTP (``--url``, default ``TOKENFLEET_URL`` or ``http://127.0.0.1:8000``;
key from ``--api-key`` or ``TOKENFLEET_API_KEY``), so it works from any machine that reaches
the fleet. Job bodies go to stdout as JSON; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from shared.errors import TokenfleetError
from shared.settings import Settings
from tokenfleet.client import JobsClient, describe_progress

Subparsers = argparse._SubParsersAction  # type: ignore[type-arg]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args: argparse.Namespace) -> JobsClient:
    return JobsClient(args.url, args.api_key or os.environ.get("TOKENFLEET_API_KEY"))


def _print_json(body: dict[str, Any]) -> None:
    print(json.dumps(body, indent=2, ensure_ascii=False))


def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.json is not None:
        raw = sys.stdin.read() if args.json == "-" else open(args.json).read()  # noqa: SIM115
        body: dict[str, Any] = json.loads(raw)
    elif args.prompt is not None:
        body = {"prompt": args.prompt}
    elif args.message is not None:
        body = {"messages": [{"role": "user", "content": args.message}]}
    else:
        raise TokenfleetError("give the request: --message TEXT, --prompt TEXT or --json FILE")
    for name, value in (("model", args.model), ("max_tokens", args.max_tokens),
                        ("lane", args.lane), ("webhook", args.webhook)):
        if value is not None:
            body[name] = value
    if args.webhook_events is not None:
        body["webhook_events_filter"] = [e for e in args.webhook_events.split(",") if e]
    return body


class _Progress:
    """One line on stderr, rewritten in place on a terminal."""

    def __init__(self) -> None:
        self.is_tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, job: dict[str, Any]) -> None:
        line = f"{job['id']}: {describe_progress(job)}"
        if line == self.last:
            return
        self.last = line
        end = "" if self.is_tty else "\n"
        print(f"\r\033[K{line}" if self.is_tty else line, end=end, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.is_tty and self.last:
            print(file=sys.stderr)


def _wait(client: JobsClient, job_id: str, timeout_s: float | None) -> int:
    progress = _Progress()
    try:
        job = client.wait(job_id, timeout_s=timeout_s, on_update=progress)
    finally:
        progress.done()
    _print_json(job)
    return 0 if job["status"] == "succeeded" else 1


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.submit(_job_body(args), idempotency_key=args.idempotency_key)
        replay = " (replayed: this key had already queued it)" if job["idempotent_replay"] \
            else ""
        print(f"queued {job['id']}{replay}", file=sys.stderr)
        if args.wait:
            return _wait(client, job["id"], args.timeout)
        _print_json(job)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job, _ = client.status(args.job_id)
    _print_json(job)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _wait(client, args.job_id, args.timeout)


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list(after=args.after, limit=args.limit, status=args.status)
    print(f"{'id':<32} {'status':<10} {'model':<24} created (UTC)")
    for job in page["data"]:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job["created_at"] or 0))
        print(f"{job['id']:<32} {job['status']:<10} {(job['model'] or '')[:24]:<24} {created}")
    if page["has_more"]:
        print(f"more: tokenfleet jobs list --after {page['last_id']}", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.purge(args.job_id) if args.purge else client.cancel(args.job_id))
    return 0


def add_jobs_parser(subparsers: Subparsers) -> None:
    jobs = subparsers.add_parser(
        "jobs", help="submit, follow and list async jobs (POST /v1/jobs)",
        description="A client of the gateway's jobs API: submit once (Idempotency-Key), "
        "wait with the server's Retry-After while showing queue position and progress, list.")
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    submit = actions.add_parser("submit", help="queue a job; print it (or --wait for it)")
    what = submit.add_mutually_exclusive_group()
    what.add_argument("--message", help="one user message (a chat job)")
    what.add_argument("--prompt", help="a completion prompt")
    what.add_argument("--json", metavar="FILE", help="the whole request body (- for stdin)")
    submit.add_argument("--model")
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--lane", choices=["interactive", "batch"])
    submit.add_argument("--webhook", metavar="URL", help="POST the job here when it completes")
    submit.add_argument("--webhook-events", metavar="EVENTS",
                        help="comma-separated: start,completed (default: completed)")
    submit.add_argument("--idempotency-key", metavar="KEY",
                        help="default: a new UUID (retries of this submit reuse it)")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after S seconds")
    submit.set_defaults(func=cmd_submit)

    status = actions.add_parser("status", help="print a job as JSON")
    status.add_argument("job_id")
    status.set_defaults(func=cmd_status)

    wait = actions.add_parser("wait", help="follow a job to its end; exit 0 if it succeeded")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, help="give up after S seconds")
    wait.set_defaults(func=cmd_wait)

    listing = actions.add_parser("list", help="your jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed",
                                              "cancelled"])
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--after", metavar="JOB_ID", help="the page after this job")
    listing.set_defaults(func=cmd_list)

    cancel = actions.add_parser("cancel", help="cancel a job (--purge: remove a finished one)")
    cancel.add_argument("job_id")
    cancel.add_argument("--purge", action="store_true",
                        help="remove the finished job's record and text now")
    cancel.set_defaults(func=cmd_cancel)

    for action in (submit, status, wait, listing, cancel):
        action.add_argument("--url", default=os.environ.get("TOKENFLEET_URL", DEFAULT_URL),
                            help="the gateway (default: TOKENFLEET_URL or %(default)s)")
        action.add_argument("--api-key", default=None,
                            help="API key (default: TOKENFLEET_API_KEY)")


# --- webhooks -------------------------------------------------------------------------------


def cmd_webhooks_run(args: argparse.Namespace) -> int:
    from webhooks.main import run

    return run(Settings())


def cmd_webhooks_secret(args: argparse.Namespace) -> int:
    from webhooks.main import new_secret

    print(new_secret())
    print("set it as TOKENFLEET_WEBHOOK_SECRET for the gateways and the dispatcher, and give "
          "it to your webhook receivers (they verify with it)", file=sys.stderr)
    return 0


def cmd_webhooks_dead(args: argparse.Namespace) -> int:
    from shared.keys import Keys
    from shared.redis_conn import sync_client

    settings = Settings()
    client = sync_client(settings)
    try:
        entries = client.xrevrange(Keys(settings.key_prefix).webhook_dead, count=args.count)
    finally:
        client.close()
    for entry_id, fields in entries:
        row = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()
               if k != b"body"}
        print(json.dumps({"id": entry_id.decode(), **row}, ensure_ascii=False))
    return 0


def add_webhooks_parser(subparsers: Subparsers) -> None:
    hooks = subparsers.add_parser(
        "webhooks", help="the webhook dispatcher, its signing secret, its dead letters",
        description="Deliver job webhooks (Standard Webhooks signatures, retries with "
        "backoff, dead-letter stream).")
    actions = hooks.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    actions.add_parser("run", help="run a dispatcher until Ctrl-C/SIGTERM").set_defaults(
        func=cmd_webhooks_run)
    actions.add_parser("secret", help="print a new TOKENFLEET_WEBHOOK_SECRET").set_defaults(
        func=cmd_webhooks_secret)
    dead = actions.add_parser("dead", help="the newest dead-lettered events (JSON lines)")
    dead.add_argument("--count", type=int, default=20)
    dead.set_defaults(func=cmd_webhooks_dead)
