"""The ``tokenfleet`` command: argument parsing and dispatch.

Subcommands: ``up`` (a whole local fleet; ``tokenfleet.up``), ``gateway``, ``worker``,
``model prepare|path``, ``keys create|list|revoke`` (``shared.apikeys``), ``jobs ...`` and
``webhooks ...`` (``tokenfleet.jobs_cli``) and ``bench`` (``bench.cli``). Configuration
comes from ``TOKENFLEET_*`` environment variables
(``shared.settings``); a few flags override them. This module imports neither torch nor
FastAPI: each subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from batches import cli as batches_cli
from shared.errors import TokenfleetError
from shared.settings import Settings
from tokenfleet import jobs_cli

if TYPE_CHECKING:
    import redis

    from shared.keys import Keys

logger = logging.getLogger("tokenfleet.cli")

DEFAULT_MAX_WORKERS = 4  # tokenfleet up --workers auto, without --max-workers


# --- settings -------------------------------------------------------------------------------


def load_settings(**overrides: object) -> Settings:
    """``Settings()`` from the environment, with the flags that were given on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# --- model ----------------------------------------------------------------------------------


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from worker.model_store import resolve_model_path

    started = time.monotonic()
    settings = load_settings()
    path = resolve_model_path(settings, prepare=True)
    if args.quantization != "none":
        from worker.engine.loader import prepare_quantized

        path = prepare_quantized(settings, args.quantization)
    logger.info("model ready in %.1f s", time.monotonic() - started)
    print(path)
    return 0


def cmd_model_path(args: argparse.Namespace) -> int:
    from worker.model_store import is_default_model, is_prepared, resolve_model_path

    settings = load_settings()
    path = resolve_model_path(settings, prepare=False)
    print(path)
    if is_default_model(settings.model) and not is_prepared(path):
        print("not prepared yet: run `tokenfleet model prepare`", file=sys.stderr)
        return 1
    return 0


# --- gateway / worker -----------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.server import run

    return run(load_settings(host=args.host, port=args.port, gateway_workers=args.workers))


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run

    return int(run(load_settings()) or 0)


# --- up -------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from tokenfleet.autoscale import ScalePolicy
    from tokenfleet.up import run_up

    settings = load_settings(host=args.host, port=args.port,
                             gateway_workers=args.gateway_workers)
    if args.workers != "auto":
        if args.min_workers is not None or args.max_workers is not None:
            raise TokenfleetError("--min-workers/--max-workers need --workers auto")
        return run_up(settings, int(args.workers))
    try:
        policy = ScalePolicy(
            min_workers=0 if args.min_workers is None else args.min_workers,
            max_workers=DEFAULT_MAX_WORKERS if args.max_workers is None else args.max_workers,
            target_requests=settings.scale_target_requests,
            idle_s=settings.scale_down_idle_s, standby=settings.scale_standby_workers)
    except ValueError as exc:
        raise TokenfleetError(str(exc)) from exc
    return run_up(settings, 0, policy)


def _workers_flag(value: str) -> str:
    if value == "auto" or value.isdigit():
        return value
    raise argparse.ArgumentTypeError("expected a number of workers or 'auto'")


def _positive_int(value: str) -> int:
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError("expected a whole number >= 1")


# --- argument parsing -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenfleet",
        description="Redis-Streams-driven LLM inference fleet. "
        "Configure with TOKENFLEET_* environment variables (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run a local fleet: redis, a gateway and workers",
                             description="Run a complete local fleet. Uses TOKENFLEET_REDIS_URL "
                             "if set, otherwise starts a private redis-server from PATH or the "
                             "bundled valkey-server (data in ./.tokenfleet/redis).")
    _add_http_flags(up)
    up.add_argument("--workers", type=_workers_flag, default="1", metavar="N|auto",
                    help="number of worker processes (default: 1), or 'auto': the autoscaler "
                    "follows the queue (TOKENFLEET_SCALE_TARGET_REQUESTS per worker, drains "
                    "workers idle for TOKENFLEET_SCALE_DOWN_IDLE_S)")
    up.add_argument("--min-workers", type=int, metavar="N",
                    help="with --workers auto: never fewer (default 0: scale to zero)")
    up.add_argument("--max-workers", type=int, metavar="N",
                    help=f"with --workers auto: never more (default {DEFAULT_MAX_WORKERS})")
    up.add_argument("--gateway-workers", type=_positive_int, metavar="N",
                    help="gateway processes on the port (TOKENFLEET_GATEWAY_WORKERS, default 1)")
    up.set_defaults(func=cmd_up)

    gateway = commands.add_parser("gateway", help="run the HTTP gateway",
                                  description="Run the HTTP gateway (FastAPI on uvicorn).")
    _add_http_flags(gateway)
    gateway.add_argument("--workers", type=_positive_int, metavar="N",
                         help="gateway processes serving the port, each with its own event "
                         "channel; one per core (TOKENFLEET_GATEWAY_WORKERS, default 1)")
    gateway.set_defaults(func=cmd_gateway)

    worker = commands.add_parser("worker", help="run one inference worker",
                                 description="Run one worker: read requests from Redis, "
                                 "batch them through the model, stream tokens back.")
    worker.set_defaults(func=cmd_worker)

    _add_model_commands(commands)
    _add_bench_command(commands)
    _add_keys_commands(commands)
    batches_cli.add_parsers(commands)  # enqueue, batch ..., orchestrator
    jobs_cli.add_jobs_parser(commands)
    jobs_cli.add_webhooks_parser(commands)
    return parser


def _add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="manage API keys stored (hashed) in Redis",
                               description="Create, list and revoke API keys. Only a SHA-256 "
                               "digest of each key is stored; TOKENFLEET_AUTH=true enforces them.")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--rpm", type=int, default=None, metavar="N",
                        help="requests per minute for this key (default: "
                        "TOKENFLEET_RATE_LIMIT_RPM; 0: unlimited)")
    create.add_argument("--tpm", type=int, default=None, metavar="N",
                        help="tokens per minute for this key, prompt + max_tokens (default: "
                        "TOKENFLEET_RATE_LIMIT_TPM; 0: unlimited)")
    create.set_defaults(func=cmd_keys_create)
    actions.add_parser("list", help="list keys (never the keys themselves)").set_defaults(
        func=cmd_keys_list)
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the id shown by `tokenfleet keys list`")
    revoke.set_defaults(func=cmd_keys_revoke)


@contextlib.contextmanager
def _key_store() -> Iterator[tuple[redis.Redis, Keys]]:
    """A Redis client and the key names, from the settings; Redis errors read as one line."""
    import redis as redis_lib

    from shared.keys import Keys
    from shared.redis_conn import sync_client
    from tokenfleet.redis_server import redact_url

    settings = Settings()
    client = sync_client(settings)
    try:
        yield client, Keys(settings.key_prefix)
    except redis_lib.RedisError as exc:
        raise TokenfleetError(f"Redis at {redact_url(settings.redis_url)}: {exc}") from exc
    finally:
        client.close()


def cmd_keys_create(args: argparse.Namespace) -> int:
    from shared.apikeys import create_key

    with _key_store() as (client, keys):
        key, record = create_key(client, keys, args.name, args.rpm, args.tpm)
    print(key)
    print(f"created {record.id} ({record.name}). This is the only time the key is shown: "
          "store it now (Redis keeps only its SHA-256 digest).", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from shared.apikeys import list_keys

    with _key_store() as (client, keys):
        records = list_keys(client, keys)
    print(f"{'id':<14} {'name':<24} {'created (UTC)':<20} {'revoked':<8} {'rpm':<8} tpm")
    for rec in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.created_at))
        revoked = "yes" if rec.revoked else "no"
        rpm = "default" if rec.rpm is None else str(rec.rpm)
        tpm = "default" if rec.tpm is None else str(rec.tpm)
        print(f"{rec.id:<14} {rec.name[:24]:<24} {created:<20} {revoked:<8} {rpm:<8} {tpm}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from shared.apikeys import revoke_key

    with _key_store() as (client, keys):
        record = revoke_key(client, keys, args.key_id)
    print(f"revoked {record.id} ({record.name}); gateways refuse it within "
          f"TOKENFLEET_AUTH_CACHE_S ({Settings().auth_cache_s:g} s)")
    return 0


def _add_bench_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tokenfleet bench``, with the flags of ``bench.cli.add_arguments``.

    The design: import ``bench.cli`` while building the parser, so ``tokenfleet bench
    --help`` lists the real flags. That is only safe because ``bench.cli`` imports no torch,
    transformers or FastAPI at module level (each system imports what it needs when it
    runs); ``tests/unit/test_cli.py`` checks that ``tokenfleet --help`` and ``tokenfleet bench
    --help`` stay torch-free. If ``bench`` is not installed or fails to import, the
    subcommand still exists and running it prints why (one line, exit 1).
    """
    description = ("Run the benchmark systems (naive, static batching, transformers CB, "
                   "engine, full path, bus) and report JSON, Markdown and a plot.")
    bench_cli, problem = _import_optional("bench.cli")
    bench = commands.add_parser("bench", help="benchmark tokenfleet against its baselines",
                                description=description)
    if bench_cli is None:  # any arguments are accepted (see main), then refused with the reason
        bench.set_defaults(func=lambda args: _bench_unavailable(problem), any_arguments=True)
        return
    bench_cli.add_arguments(bench)
    bench.set_defaults(func=lambda args: bench_cli.run(args, Settings()))


def _import_optional(name: str) -> tuple[ModuleType | None, str]:
    """``(module, "")`` if ``name`` imports, else ``(None, why not)``; never raises."""
    try:
        if importlib.util.find_spec(name) is None:
            return None, f"{name} is not installed"
        return importlib.import_module(name), ""
    except Exception as exc:  # a missing parent, a broken module: other commands still work
        return None, f"{name} cannot be imported ({type(exc).__name__}: {exc})"


def _bench_unavailable(problem: str) -> int:
    raise TokenfleetError(f"tokenfleet bench is unavailable: {problem}. It ships in the "
                          "source checkout (pip install -e '.[worker,bench]').")


def _add_http_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="bind address (TOKENFLEET_HOST)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (TOKENFLEET_PORT)")


def _add_model_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    model = commands.add_parser("model", help="prepare the model or show where it is",
                                description="Manage the served model (TOKENFLEET_MODEL).")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prepare = actions.add_parser(
        "prepare", help="convert the built-in model to safetensors once; print its path",
        description="Convert the built-in GGUF model into a safetensors checkpoint under "
        "TOKENFLEET_MODEL_DIR (once) and print its path. With --quantization int8-torch, "
        "also write pre-quantized weights (<model>-int8-torch) that workers with "
        "TOKENFLEET_QUANTIZATION=int8-torch (or auto choosing it) load without quantizing.",
    )
    prepare.add_argument("--quantization", choices=("none", "int8-torch"), default="none",
                         help="also write pre-quantized weights in this mode")
    prepare.set_defaults(func=cmd_model_prepare)
    actions.add_parser(
        "path", help="print the model directory a worker would load",
        description="Print the model directory a worker would load; exit 1 if the built-in "
        "model is not prepared yet.",
    ).set_defaults(func=cmd_model_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        _setup_logging(Settings().log_level)
        return int(args.func(args))
    except ValidationError as exc:
        print(f"tokenfleet: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except (TokenfleetError, subprocess.CalledProcessError) as exc:
        print(f"tokenfleet: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
