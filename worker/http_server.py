"""The worker's only HTTP port (``TOKENFLEET_METRICS_PORT``; 0 = none): ``/metrics`` for
Prometheus, ``/healthz`` (the process is up) and ``/readyz`` (the model is loaded and the
loop serves: 503 while starting or draining) for Kubernetes probes. A daemon thread; it
never touches Redis or the engine, only the status object the loop keeps up to date.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from worker.heartbeat import STATE_READY, WorkerStatus

HEALTH_PATHS = ("/healthz", "/readyz")
StartResponse = Callable[..., Any]


class WorkerHttpServer:
    def __init__(self, registry: CollectorRegistry, status: WorkerStatus) -> None:
        self.status = status
        self._metrics_app = make_wsgi_app(registry)
        self._server: WSGIServer | None = None

    def start(self, port: int, host: str = "0.0.0.0") -> int:
        """Listen on ``port`` (0: a free one, for tests); returns the port."""
        self._server = make_server(host, port, self._app, ThreadingWSGIServer,
                                   handler_class=_SilentHandler)
        threading.Thread(target=self._server.serve_forever, name="metrics-http",
                         daemon=True).start()
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            return _json(start_response, 200, {"status": "ok"})
        if path == "/readyz":
            status = self.status
            ready = status.state == STATE_READY and status.is_warm
            body = {"status": "ok" if ready else "unavailable", "state": status.state,
                    "worker": status.worker_id, "model": status.model}
            return _json(start_response, 200 if ready else 503, body)
        return self._metrics_app(environ, start_response)


def _json(start_response: StartResponse, code: int, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    reason = "OK" if code == 200 else "Service Unavailable"
    start_response(f"{code} {reason}", [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(data)))])
    return [data]
