"""The gateway's Prometheus metrics: its own counters, and the fleet's gauges read from Redis
at scrape time (``gateway.fleetview``), all with vLLM-style ``tokenfleet:`` names.

One process per gateway: each uvicorn process subscribes to its own reply channel under its
own gateway id, so running more processes means running more gateways, each scraped on its
own (``tokenfleet gateway`` starts exactly one). Counters therefore add up across gateways
with ``sum``; the fleet gauges (queue depth, workers) are the same on every gateway and
aggregate with ``max``. Each app has its own registry (tests build many apps per process).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.fleetview import FleetView
from shared.telemetry import REQUEST_LATENCY_BUCKETS_S

PREFIX = "tokenfleet:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
THROTTLE_CAUSES = ("backlog", "rate_limit")
WORKER_STATES = ("starting", "standby", "ready", "draining")
UNMATCHED_ROUTE = "unmatched"  # one label for every unknown path: bounded cardinality


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.info = Gauge(f"{PREFIX}gateway_info", "Always 1; labels say which gateway this is",
                          ["gateway_id"], registry=r)
        self.submitted = Counter(f"{PREFIX}gateway_requests",
                                 "Generation requests queued by this gateway",
                                 ["model_name", "kind", "lane"], registry=r)
        self.throttled = Counter(f"{PREFIX}requests_throttled",
                                 "Requests answered 429, by cause", ["cause"], registry=r)
        self.open_requests = Gauge(f"{PREFIX}gateway_open_requests",
                                   "Live requests this gateway waits on (streams and "
                                   "non-streamed answers)", registry=r)
        self.http_requests = Counter(f"{PREFIX}http_requests", "HTTP requests answered",
                                     ["method", "route", "status"], registry=r)
        self.http_duration = Histogram(f"{PREFIX}http_request_duration_seconds",
                                       "From request to the end of the response body "
                                       "(streams included)", ["method", "route"],
                                       buckets=REQUEST_LATENCY_BUCKETS_S, registry=r)
        for cause in THROTTLE_CAUSES:
            self.throttled.labels(cause)

    def describe(self, gateway_id: str) -> None:
        self.info.labels(gateway_id).set(1)

    def on_submitted(self, model: str, kind: str, lane: str) -> None:
        self.submitted.labels(model, kind, lane).inc()

    def on_throttled(self, cause: str) -> None:
        self.throttled.labels(cause).inc()

    def render(self, fleet: FleetView, num_open_requests: int) -> bytes:
        """The text exposition: this gateway's metrics, then the fleet's."""
        self.open_requests.set(num_open_requests)
        fleet_registry = CollectorRegistry(auto_describe=False)
        fleet_registry.register(FleetCollector(fleet))
        return generate_latest(self.registry) + generate_latest(fleet_registry)


class FleetCollector(Collector):
    """Gauges of one ``FleetView`` (read once per scrape)."""

    def __init__(self, fleet: FleetView) -> None:
        self.fleet = fleet

    def collect(self) -> Iterable[Metric]:
        lane_labels = ["model_name", "lane"]
        lag = GaugeMetricFamily(f"{PREFIX}queue_lag_requests",
                                "Queued requests no worker has taken yet", labels=lane_labels)
        pending = GaugeMetricFamily(f"{PREFIX}queue_pending_requests",
                                    "Requests taken by a worker, not yet acknowledged",
                                    labels=lane_labels)
        depth = GaugeMetricFamily(f"{PREFIX}queue_depth_requests",
                                  "lag + pending: what backpressure and autoscaling use",
                                  labels=lane_labels)
        dead = GaugeMetricFamily(f"{PREFIX}dead_letter_requests",
                                 "Entries in the model's dead-letter stream",
                                 labels=["model_name"])
        workers = GaugeMetricFamily(f"{PREFIX}workers", "Live workers, by state",
                                    labels=["model_name", "state"])
        running = GaugeMetricFamily(f"{PREFIX}fleet_requests_running",
                                    "Requests in running batches, over live workers",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily(f"{PREFIX}fleet_requests_waiting",
                                    "Requests waiting inside workers, over live workers",
                                    labels=["model_name"])
        desired = GaugeMetricFamily(f"{PREFIX}autoscaler_desired_workers",
                                    "The autoscaler's target worker count",
                                    labels=["model_name"])
        for model in self.fleet.models:
            for lane in model.lanes:
                lag.add_metric([model.name, lane.lane], lane.lag)
                pending.add_metric([model.name, lane.lane], lane.pending)
                depth.add_metric([model.name, lane.lane], lane.depth)
            dead.add_metric([model.name], model.dead_letters)
            mine = self.fleet.workers_of(model.name)
            for state in WORKER_STATES:
                workers.add_metric([model.name, state], sum(w.state == state for w in mine))
            running.add_metric([model.name], sum(w.num_running for w in mine))
            waiting.add_metric([model.name], sum(w.num_waiting for w in mine))
            if model.scaler and isinstance(model.scaler.get("desired"), int):
                desired.add_metric([model.name], model.scaler["desired"])
        batches = GaugeMetricFamily(f"{PREFIX}batches_active",
                                    "Batches not yet in a final status, by status",
                                    labels=["status"])
        lines = GaugeMetricFamily(f"{PREFIX}batch_lines",
                                  "Lines of the active batches: total, completed, failed",
                                  labels=["state"])
        by_status: dict[str, int] = {}
        for batch in self.fleet.batches:
            by_status[batch.status] = by_status.get(batch.status, 0) + 1
        for status, count in sorted(by_status.items()):
            batches.add_metric([status], count)
        for state in ("total", "completed", "failed"):
            lines.add_metric([state], sum(getattr(b, state) for b in self.fleet.batches))
        yield from (lag, pending, depth, dead, workers, running, waiting, desired, batches,
                    lines)


class HttpMetricsMiddleware:
    """Counts every HTTP response by method, route template and status, and times it to the
    end of its body. Paths that match no route share one label."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope.get("method", "GET")
            self.metrics.http_requests.labels(method, label, str(status)).inc()
            self.metrics.http_duration.labels(method, label).observe(
                time.perf_counter() - started)
