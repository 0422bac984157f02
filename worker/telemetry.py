"""A daemon thread that writes the worker's telemetry sample to Redis every two seconds
(``shared.telemetry``: the dashboard's charts and recent jobs) and keeps the state gauge in
step with the worker's status. Its own Redis connection; a failed write is logged once and
dropped (telemetry is not worth a retry queue). It also points the state gauge at the
worker's status."""

from __future__ import annotations

import logging
import threading
import time

import redis

from shared.keys import Keys
from shared.telemetry import SAMPLE_INTERVAL_S, queue_sample
from worker.heartbeat import STATE_DRAINING, STATE_READY, STATE_STARTING, WorkerStatus
from worker.metrics import WorkerMetrics
from worker.standby import STATE_STANDBY

logger = logging.getLogger(__name__)

STATES = (STATE_STARTING, STATE_STANDBY, STATE_READY, STATE_DRAINING)


class TelemetryWriter:
    def __init__(self, client: redis.Redis, keys: Keys, metrics: WorkerMetrics,
                 status: WorkerStatus, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.client = client
        self.keys = keys
        self.metrics = metrics
        self.status = status
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._is_failing = False
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        metrics.watch_state(lambda: status.state, STATES)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write what is left (the last requests of a drain)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5.0)
        self.flush()
        self.client.close()

    def flush(self) -> None:
        sample = self.metrics.take_sample()
        if sample.is_empty:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            queue_sample(pipe, self.keys, sample, time.time())
            pipe.execute()
        except redis.RedisError as exc:
            if not self._is_failing:
                logger.warning("telemetry write failed (dropping samples until Redis "
                               "answers): %s", exc)
            self._is_failing = True
            return
        self._is_failing = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()
