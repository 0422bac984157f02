"""Fuzz the gateway from its own OpenAPI schema: no input may cause a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.fleet import Fleet, make_fleet

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 25


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, TOKENFLEET_ENGINE="null", TOKENFLEET_NULL_ENGINE_TOKENS="4",
                       TOKENFLEET_MAX_TOKENS_CAP="64", TOKENFLEET_DEFAULT_MAX_TOKENS="8")
    try:
        fleet.start_gateway()
        fleet.start_worker()
        fleet.wait_ready(num_workers=1)
        yield fleet
    finally:
        fleet.stop()


def test_no_input_makes_the_gateway_fail(fleet: Fleet) -> None:
    schema = schemathesis.openapi.from_url(f"{fleet.url}/openapi.json")
    schema.config.base_url = fleet.url
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/jobs"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> "
                                f"{response.status_code}: {response.text[:200]}")
        fuzz()
    assert not failures, "\n".join(failures[:10])
    with httpx.Client(base_url=fleet.url, timeout=30) as client:  # and still healthy
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        ok = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert ok.status_code == 200, ok.text
