"""Fixtures shared by all tests: a throw-away Redis server on a free port.

The server binary is ``TOKENFLEET_TEST_REDIS_SERVER`` if set (e.g. the bundled
``valkey-server``, to check that tokenfleet works on it), else ``redis-server`` on PATH.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokenfleet.supervisor import RedisProcess
from tokenfleet.supervisor import free_port as free_port  # re-exported for the tests

TEST_REDIS_ENV = "TOKENFLEET_TEST_REDIS_SERVER"


def redis_binary() -> Path | None:
    """The server the tests run: ``$TOKENFLEET_TEST_REDIS_SERVER``, else ``redis-server``."""
    chosen = os.environ.get(TEST_REDIS_ENV, "").strip()
    if chosen:
        return Path(chosen)
    found = shutil.which("redis-server")
    return Path(found) if found else None


class RedisServer(RedisProcess):
    """A private Redis with AOF on (``restart()`` keeps its data); skips without a server."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        binary = redis_binary()
        if binary is None:
            pytest.skip("redis-server not on PATH (or set TOKENFLEET_TEST_REDIS_SERVER)")
        super().__init__(binary, data_dir, port, aof=True)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.data_dir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def tf_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for tokenfleet subprocesses pointed at the throw-away Redis."""
    env = dict(os.environ)
    env.update({
        "TOKENFLEET_REDIS_URL": redis_url,
        "TOKENFLEET_KEY_PREFIX": "tftest",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, prepared once into ``Settings().model_dir`` (idempotent: about
    20 s the first time on a fresh machine, well under a second once prepared)."""
    from shared.settings import Settings
    from worker.model_store import prepare_model

    return prepare_model(Settings())
