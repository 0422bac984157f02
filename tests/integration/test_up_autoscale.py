"""``tokenfleet up --workers auto --min-workers 0``: the fleet starts a bootstrap worker (the
model is unknown to a fresh Redis), scales it away, answers a request from zero workers,
goes back to zero, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.conftest import free_port
from tests.integration.fleet import REPO
from tests.integration.waiting import wait_for
from tokenfleet.supervisor import Supervisor

pytestmark = pytest.mark.integration

MODEL = "null-model"


def test_up_autoscales_from_zero_and_back(tf_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = dict(tf_env, PYTHONPATH=str(REPO), TOKENFLEET_ENGINE="null",
               TOKENFLEET_SERVED_MODEL_NAME=MODEL, TOKENFLEET_PORT=str(port),
               TOKENFLEET_SCALE_DOWN_IDLE_S="1", TOKENFLEET_GATEWAY_SHUTDOWN_DELAY_S="0")
    url = f"http://127.0.0.1:{port}"
    client = redis.Redis.from_url(tf_env["TOKENFLEET_REDIS_URL"])
    keys = Keys(tf_env["TOKENFLEET_KEY_PREFIX"])

    def scaler() -> dict[str, object]:
        return json.loads(client.hget(keys.fleet_scaler, MODEL) or b"{}")

    def live_workers() -> int:
        return len(httpx.get(f"{url}/v1/fleet", timeout=5).json()["workers"])

    supervisor = Supervisor(env, log_dir=tmp_path, cwd=tmp_path, stop_timeout_s=30)
    up = supervisor.start("up", [sys.executable, "-m", "tokenfleet", "up", "--workers", "auto",
                                 "--max-workers", "2"])
    try:
        supervisor.wait_until(lambda: "tokenfleet is up" in up.log_tail(), 60, "the banner")
        assert "workers:  auto, 0..2" in up.log_tail()
        supervisor.wait_until(lambda: bool(client.sismember(keys.models, MODEL)), 60,
                              "the bootstrap worker")
        wait_for(lambda: scaler().get("workers") == 0 and live_workers() == 0, timeout_s=30,
                 interval_s=0.1)
        assert httpx.get(f"{url}/readyz").json()["scale_to_zero"] is True
        resp = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "from zero", "max_tokens": 4})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4
        wait_for(lambda: scaler().get("workers") == 0 and live_workers() == 0, timeout_s=30,
                 interval_s=0.1)
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=60) == 0, up.log_tail()
    finally:
        supervisor.stop()
        client.close()
    log = (tmp_path / "up.log").read_text()
    assert log.count("drained and exited") >= 2  # the bootstrap worker and the request's
    assert "exited on its own" not in log
