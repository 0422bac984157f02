"""``tokenfleet up``: a whole local fleet, supervised until Ctrl-C or SIGTERM.

Redis (``tokenfleet.redis_server`` says which), the model prepared once in a child process
(torch stays out of the supervisor), one gateway and N workers as ``python -m tokenfleet``
children of one ``Supervisor``; stopped app processes first, Redis last.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable

from shared.keys import Keys
from shared.settings import Settings
from tokenfleet.autoscale import TICK_S, Autoscaler, ScalePolicy
from tokenfleet.redis_server import (
    RedisPlan,
    check_external_redis,
    pick_redis_port,
    plan_redis,
    port_is_free,
    redact_url,
    redis_data_dir,
    server_version,
)
from tokenfleet.supervisor import (
    FleetError,
    RedisProcess,
    Supervisor,
    free_port,
    http_answers,
    role_argv,
    spawn,
)

logger = logging.getLogger("tokenfleet.up")

KILL_MARGIN_S = 5.0  # extra wait past the drain timeouts before children are killed


def auth_mode(settings: Settings) -> str:
    """One line saying whether the gateway requires API keys, and the default limits."""
    if not settings.auth:
        return "off (local use: no API key needed; set TOKENFLEET_AUTH=true to require keys)"
    limits = ", ".join(f"{value} {unit}/min" for value, unit in (
        (settings.rate_limit_rpm, "requests"), (settings.rate_limit_tpm, "tokens")) if value)
    return (f"ON: every /v1 request needs 'Authorization: Bearer <key>'; "
            f"{len(settings.api_keys)} static keys from TOKENFLEET_API_KEYS + keys stored in "
            f"Redis (`tokenfleet keys create`); default limits per key: {limits or 'none'}")


def webhooks_mode(settings: Settings) -> str:
    """One line saying whether jobs may name a webhook (a dispatcher runs) or not."""
    if settings.webhook_secret is None:
        return ("off (set TOKENFLEET_WEBHOOK_SECRET, e.g. from `tokenfleet webhooks secret`, "
                "to deliver job webhooks)")
    private = ", private hosts allowed" if settings.webhook_allow_private else ""
    return f"one dispatcher, signed with TOKENFLEET_WEBHOOK_SECRET{private}"


def stop_timeout_s(settings: Settings) -> float:
    """How long ``up`` waits for its children to drain before it kills them."""
    gateway_s = settings.gateway_shutdown_delay_s + settings.gateway_drain_timeout_s
    return max(settings.drain_timeout_s, gateway_s) + KILL_MARGIN_S


def local_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def start_redis(fleet: Supervisor, plan: RedisPlan, settings: Settings) -> tuple[str, str]:
    """(URL, description) of the Redis the fleet uses: checked if external, else started."""
    if plan.mode == "external":
        check_external_redis(str(plan.url))
        return str(plan.url), f"external {redact_url(str(plan.url))}"
    assert plan.binary is not None
    fleet.redis = RedisProcess(plan.binary, redis_data_dir(settings), pick_redis_port())
    fleet.redis.start()
    version = server_version(plan.binary)
    logger.info("private %s on port %d, data in %s", version, fleet.redis.port,
                fleet.redis.data_dir)
    return fleet.redis.url, f"private {fleet.redis.url} ({version}, {plan.binary})"


def run_up(settings: Settings, workers: int, scaling: ScalePolicy | None = None) -> int:
    """Run a local fleet until Ctrl-C/SIGTERM (-> 0) or until a child dies (-> 1).

    With ``scaling`` (``--workers auto``) the autoscaler starts and drains the workers and
    ``workers`` is ignored."""
    if scaling is None and workers < 1:
        raise FleetError("--workers must be at least 1")
    if not port_is_free(settings.port, settings.host):
        raise FleetError(f"port {settings.port} on {settings.host} is in use; pass --port")
    plan = plan_redis(os.environ)
    logger.info("auth: %s", auth_mode(settings))
    fleet = Supervisor(os.environ, stop_timeout_s=stop_timeout_s(settings))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, fleet.request_stop)
    scaler: Autoscaler | None = None
    try:
        redis_url, redis_text = start_redis(fleet, plan, settings)
        settings = settings.model_copy(update={"redis_url": redis_url})
        model = _ensure_model(settings)
        fleet.env.update(TOKENFLEET_REDIS_URL=redis_url, TOKENFLEET_HOST=settings.host,
                         TOKENFLEET_PORT=str(settings.port),
                         TOKENFLEET_GATEWAY_WORKERS=str(settings.gateway_workers))
        if scaling is not None and scaling.min_workers == 0:
            fleet.env["TOKENFLEET_SCALE_TO_ZERO"] = "true"  # queue while no worker runs
        fleet.start_role("gateway", "gateway")
        if scaling is None:
            ports = [free_port() for _ in range(workers)]
            for index, port in enumerate(ports):
                fleet.start_role(f"worker-{index + 1}", "worker",
                                 extra_env={"TOKENFLEET_METRICS_PORT": str(port)})
            worker_text = f"{workers} (engine: {settings.engine})"
            metrics_text = ", ".join(f":{port}" for port in ports)
        else:
            scaler = make_autoscaler(settings, scaling, fleet.env)
            worker_text = (f"auto, {scaling.min_workers}..{scaling.max_workers} (engine: "
                           f"{settings.engine}; {scaling.target_requests} requests per worker, "
                           f"drained after {scaling.idle_s:g} s idle)")
            metrics_text = "a free port each, logged when it starts"
        fleet.start_role("orchestrator", "orchestrator")  # drives offline batches (arq)
        if settings.webhook_secret is not None:  # without a secret no job may name a webhook
            fleet.start_role("webhooks", "webhooks", "run")
        banner = _banner(settings, redis_text, worker_text, model, metrics_text)
        print_banner = _print_when_ready(settings, banner)
        autoscale = scaler.tick_safely if scaler is not None else (lambda: None)

        def tick() -> None:
            print_banner()
            autoscale()

        return fleet.supervise(tick, interval_s=TICK_S)
    finally:
        if scaler is not None:
            scaler.stop(stop_timeout_s(settings))
        fleet.stop()


def make_autoscaler(settings: Settings, policy: ScalePolicy,
                    env: dict[str, str]) -> Autoscaler:
    """The autoscaler of ``--workers auto``: its workers are its own children (they exit
    when drained, which must not stop the fleet), each with a free metrics port."""
    import redis

    def start(name: str, standby: bool) -> subprocess.Popen[bytes]:
        port = free_port()
        proc = spawn(role_argv("worker"), {**env, "TOKENFLEET_METRICS_PORT": str(port),
                                           "TOKENFLEET_WORKER_STANDBY": str(standby).lower()})
        logger.info("started %s (pid %d), metrics on :%d", name, proc.pid, port)
        return proc

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0,
                                  socket_connect_timeout=2.0)
    return Autoscaler(client, Keys(settings.key_prefix), settings.model_name, policy, start,
                      heartbeat_ttl_s=settings.heartbeat_ttl_s)


def _ensure_model(settings: Settings) -> str:
    """Prepare the model in a child process (keeps torch out of the supervisor)."""
    if settings.engine == "null":
        return f"{settings.model_name} (null engine: no model loaded)"
    from worker.model_store import is_default_model, is_prepared, resolve_model_path

    path = resolve_model_path(settings, prepare=False)
    if is_default_model(settings.model) and not is_prepared(path):
        logger.info("first run: preparing the model (about 30 s)")
        subprocess.run(role_argv("model", "prepare"), check=True, stdout=subprocess.DEVNULL)
    return f"{settings.model_name} ({path})"


def _banner(settings: Settings, redis_text: str, workers: str, model: str,
            worker_metrics: str) -> str:
    host = local_host(settings.host)
    listening = "" if host == settings.host else f"  (listening on {settings.host})"
    return "\n".join([
        "",
        "tokenfleet is up",
        f"  gateway:  http://{host}:{settings.port}{listening}{_processes(settings)}",
        f"  redis:    {redis_text}",
        f"  model:    {model}",
        f"  workers:  {workers}",
        f"  metrics:  http://{host}:{settings.port}/metrics (fleet), workers {worker_metrics}",
        f"  dashboard: http://{host}:{settings.port}/dashboard",
        "  batches:  one orchestrator (tokenfleet enqueue FILE.jsonl)",
        f"  webhooks: {webhooks_mode(settings)}",
        f"  auth:     {auth_mode(settings)}",
        "Press Ctrl-C to stop.",
        "",
    ])


def _processes(settings: Settings) -> str:
    count = settings.gateway_workers
    return f" ({count} processes)" if count > 1 else ""


def _print_when_ready(settings: Settings, banner: str) -> Callable[[], None]:
    """A supervisor tick that prints ``banner`` once, when the gateway answers HTTP."""
    url = f"http://{local_host(settings.host)}:{settings.port}/healthz"
    printed = False

    def tick() -> None:
        nonlocal printed
        if not printed and http_answers(url):
            print(banner, flush=True)
            printed = True

    return tick
