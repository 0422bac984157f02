"""Worker entry point: build the engine, run the queue loop, return the exit code.

``tokenfleet worker`` calls ``run(settings)``; ``python -m worker.main`` does the same with
settings from the environment.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from collections.abc import Callable

from shared.errors import ModelLoadError
from shared.keys import Keys
from shared.model_info import ModelInfo
from shared.redis_conn import sync_client
from shared.settings import Settings
from worker.engine.types import Engine
from worker.heartbeat import Heartbeat, WorkerStatus
from worker.http_server import WorkerHttpServer
from worker.metrics import WorkerMetrics
from worker.null_engine import NullEngine, null_model_info
from worker.service import ShutdownSignal, WorkerService
from worker.standby import STATE_STANDBY, Promotion
from worker.startup import StartupClock
from worker.telemetry import TelemetryWriter

logger = logging.getLogger(__name__)

EngineBuilder = Callable[[Settings], tuple[Engine, ModelInfo]]


def make_worker_id() -> str:
    """``hostname-pid-random``: unique per process, readable in ``XINFO CONSUMERS``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def build_engine(settings: Settings,
                 clock: StartupClock | None = None) -> tuple[Engine, ModelInfo]:
    if settings.engine == "null":
        engine = NullEngine(settings.max_batch_size, settings.null_engine_tokens,
                            settings.null_engine_step_ms / 1000,
                            kv_tokens_budget=settings.max_batch_tokens)
        return engine, null_model_info(settings.model_name, settings.max_batch_tokens)
    from worker.engine.factory import build_engine as build_hf_engine  # torch: only here

    if clock is not None:
        clock.mark("torch_import")
    return build_hf_engine(settings, on_stage=clock.mark if clock is not None else None)


def start_heartbeat(settings: Settings, status: WorkerStatus) -> Heartbeat:
    heartbeat = Heartbeat(sync_client(settings), Keys(settings.key_prefix), status,
                          settings.heartbeat_interval_s, settings.heartbeat_ttl_s)
    heartbeat.start()
    return heartbeat


def run(settings: Settings, build: EngineBuilder = build_engine) -> int:
    """Serve ``settings.model`` until SIGTERM/SIGINT; 0 after a clean drain, 1 on failure.

    ``build`` makes the engine (tests pass a slowed-down null engine)."""
    code = _run(settings, build)
    exit_if_compiling(code)
    return code


def exit_if_compiling(code: int) -> None:
    """Stopped while the compiled decode step still warms up in its thread (compile_warmup.py):
    end the process now, everything else closed, since the interpreter's own exit would abort
    under that thread (C++ "terminate called"), or wait for a compile."""
    warmup = sys.modules.get("worker.engine.compile_warmup")  # imported only with torch
    if warmup is None or not warmup.any_warming():
        return
    logger.info("exiting while the compiled decode step is still warming up")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(settings: Settings, build: EngineBuilder) -> int:
    shutdown = ShutdownSignal()
    shutdown.install()
    status = WorkerStatus(worker_id=make_worker_id(), model=settings.model_name,
                          quantization=settings.quantization, dtype=settings.dtype)
    promotion = Promotion()
    if settings.worker_standby:
        promotion.install()  # before the model loads: an early SIGUSR1 is remembered
    metrics = WorkerMetrics(settings.model_name, status.worker_id)
    clock = metrics.start_clock()
    http = start_http_server(settings, metrics, status)  # probes answer while it loads
    heartbeat = start_heartbeat(settings, status)  # "starting" while the model loads
    telemetry = TelemetryWriter(sync_client(settings), Keys(settings.key_prefix), metrics,
                                status)
    telemetry.start()
    try:
        try:
            engine, model_info = (build_engine(settings, clock)
                                  if build is build_engine else build(settings))
        except ModelLoadError as exc:
            logger.error("could not load the model: %s", exc)
            return 1
        metrics.describe(model_info.dtype, model_info.quantization)
        if settings.worker_standby and not wait_as_standby(status, promotion, shutdown):
            return 0  # stopped before it was promoted: it never took anything
        if settings.worker_standby:
            clock.mark("standby")
        return serve(settings, engine, model_info, status=status, shutdown=shutdown,
                     metrics=metrics)
    finally:
        telemetry.stop()
        heartbeat.stop()
        if http is not None:
            http.stop()


def wait_as_standby(status: WorkerStatus, promotion: Promotion,
                    shutdown: ShutdownSignal) -> bool:
    """Loaded and warm; heartbeat ``standby`` until SIGUSR1 (-> True) or SIGTERM (-> False)."""
    status.state = STATE_STANDBY
    logger.info("standby: model loaded; waiting for SIGUSR1 to serve")
    promoted = promotion.wait(lambda: shutdown.is_requested)
    if promoted:
        logger.info("promoted: serving")
    return promoted


def start_http_server(settings: Settings, metrics: WorkerMetrics,
                      status: WorkerStatus) -> WorkerHttpServer | None:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``TOKENFLEET_METRICS_PORT`` (0: none)."""
    if not settings.metrics_port:
        return None
    server = WorkerHttpServer(metrics.registry, status)
    port = server.start(settings.metrics_port)
    logger.info("metrics on http://0.0.0.0:%d/metrics", port)
    return server


def serve(settings: Settings, engine: Engine, model_info: ModelInfo, *, status: WorkerStatus,
          shutdown: ShutdownSignal, metrics: WorkerMetrics | None = None) -> int:
    """Run the queue loop around a built engine."""
    status.model = model_info.name
    status.quantization = model_info.quantization
    status.dtype = model_info.dtype
    service = WorkerService(settings, engine, model_info, status=status, shutdown=shutdown,
                            metrics=metrics)
    try:
        return service.run()
    except Exception:
        logger.exception("worker loop failed; unfinished requests stay pending for others")
        return 1


def setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> int:
    settings = Settings()
    setup_logging(settings)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
