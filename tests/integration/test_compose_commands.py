"""docker-compose.yml run without Docker: each app service's own ``command`` (every service
built from the project's image) started as a
local process with the environment compose gives it (the image's ``ENV`` from the
Dockerfile, then the service's ``environment`` with ``${VAR:-default}`` resolved as compose
does with nothing set), against a throw-away Redis. The fleet must answer: a chat completion
through the gateway and the worker, a batch through the orchestrator, the gateway's
healthcheck command, every process stopping cleanly. A renamed variable or a wrong command
in the compose file fails here.

Only what cannot hold outside a container is replaced, and each replacement is checked
against the compose file first: the host ``redis`` (-> the throw-away Redis), the published
gateway port and the workers' metrics port (-> free ports), ``/models`` (-> the locally
prepared model, which the image prepares at build), and ``tokenfleet`` (-> this checkout's
``python -m tokenfleet``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import RedisServer, free_port
from tests.integration.fleet import REPO
from tokenfleet.supervisor import Supervisor

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: object, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}``."""
    return INTERPOLATION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), str(value))


def image_env(dockerfile: str) -> dict[str, str]:
    """The ``ENV`` lines of the Dockerfile (``KEY=value`` pairs, backslash continuations)."""
    env: dict[str, str] = {}
    text = dockerfile.replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    return env


def service_env(service: dict[str, Any], base: dict[str, str]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {**base, **{k: interpolate(v, {}) for k, v in env.items()}}


def grace_s(service: dict[str, Any]) -> float:
    """The service's ``stop_grace_period`` (compose's default: 10 s)."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(service.get("stop_grace_period", "10s")))
    assert match is not None
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def local_argv(command: list[str]) -> list[str]:
    assert command[0] == "tokenfleet", command  # the image's console script
    return [sys.executable, "-m", "tokenfleet", *command[1:]]


def upload_batch(client: httpx.Client, model: str, lines: int) -> str:
    body = "".join(json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": 4, "temperature": 0,
                 "messages": [{"role": "user", "content": f"Count to {i + 2}"}]}}) + "\n"
        for i in range(lines))
    uploaded = client.post("/v1/files", data={"purpose": "batch"},
                           files={"file": ("lines.jsonl", body.encode(), "application/jsonl")})
    assert uploaded.status_code == 200, uploaded.text
    batch = client.post("/v1/batches", json={
        "input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    return str(batch.json()["id"])


def test_compose_services_run_as_local_processes(tmp_path: Path, smollm2_dir: Path) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    image = services["gateway"]["image"]
    app_services = [name for name, service in services.items() if service.get("image") == image]
    assert {"gateway", "worker", "orchestrator"} <= set(app_services)
    dockerfile = (REPO / "Dockerfile").read_text()
    base = image_env(dockerfile)
    assert base["TOKENFLEET_MODEL_DIR"] == "/models"
    assert "RUN tokenfleet model prepare" in dockerfile  # so /models holds the model

    redis = RedisServer(tmp_path / "redis")
    redis.data_dir.mkdir()
    redis.start()
    gateway_port, metrics_port = free_port(), free_port()
    envs: dict[str, dict[str, str]] = {}
    for name in app_services:
        env = service_env(services[name], base)
        url = env["TOKENFLEET_REDIS_URL"]
        assert url == "redis://redis:6379/0" and "redis" in services[name]["depends_on"]
        env["TOKENFLEET_REDIS_URL"] = redis.url
        env["TOKENFLEET_MODEL_DIR"] = str(smollm2_dir.parent)
        envs[name] = env
    published = services["gateway"]["ports"][0].split(":")
    assert published[-1] == envs["gateway"]["TOKENFLEET_PORT"]
    envs["gateway"]["TOKENFLEET_PORT"] = str(gateway_port)
    envs["worker"]["TOKENFLEET_METRICS_PORT"] = str(metrics_port)

    host = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFLEET_")}
    host.update(PYTHONPATH=str(REPO))
    supervisor = Supervisor(host, log_dir=tmp_path, cwd=tmp_path, stop_timeout_s=60,
                            redis=redis)
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        children = {name: supervisor.start(name, local_argv(services[name]["command"]),
                                           extra_env=envs[name]) for name in app_services}
        supervisor.wait_ready(url, num_workers=1, timeout_s=180)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        with httpx.Client(base_url=url, timeout=120) as client:
            chat = client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]})
            assert chat.status_code == 200, chat.text
            assert chat.json()["usage"]["completion_tokens"] > 0
            batch_id = upload_batch(client, model, lines=2)
            deadline = time.monotonic() + 120
            while (status := client.get(f"/v1/batches/{batch_id}").json())["status"] \
                    != "completed":
                assert status["status"] in ("validating", "in_progress", "finalizing"), status
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
        worker_ready = httpx.get(f"http://127.0.0.1:{metrics_port}/readyz")
        assert worker_ready.status_code == 200
        check = services["gateway"]["healthcheck"]["test"]
        assert check[0] == "CMD" and check[1] == "python"
        probe = [sys.executable, *(arg.replace("127.0.0.1:8000", f"127.0.0.1:{gateway_port}")
                                   for arg in check[2:])]
        assert subprocess.run(probe, timeout=30).returncode == 0
        for name, child in children.items():
            assert child.proc.poll() is None, f"{name} exited:\n{child.log_tail()}"
        for name in app_services:  # as compose stops them: SIGTERM, then its grace period
            children[name].proc.terminate()
            code = children[name].proc.wait(timeout=grace_s(services[name]))
            assert code == 0, children[name].log_tail()
    finally:
        supervisor.stop()
