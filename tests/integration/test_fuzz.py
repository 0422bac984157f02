"""Fuzz the gateway from its own OpenAPI schema: no input may cause a 5xx other than the
documented ones a client can act on (``DOCUMENTED_5XX``, see docs/api.md).

A real gateway process and a null-engine worker; a fixed number of examples per operation
with a fixed seed (``derandomize``), with auth off and with auth and rate limits on (then
every case carries a valid key, so the fuzzing reaches past the 401).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.fleet import Fleet, running_fleet

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 30
KEY = "tf-fuzz-static-key"
# 504 queue_timeout: the request waited in the queue past the ``timeout`` it asked for (a
# fuzzed tiny timeout expires or not depending on the CPU's speed: both answers are right).
DOCUMENTED_5XX = frozenset({(504, "queue_timeout")})
AUTH_ENV = {"TOKENFLEET_AUTH": "true", "TOKENFLEET_API_KEYS": KEY,
            "TOKENFLEET_RATE_LIMIT_RPM": "100000", "TOKENFLEET_RATE_LIMIT_TPM": "100000000"}


@pytest.fixture(params=["auth-off", "auth-on"])
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    with running_fleet(tmp_path, TOKENFLEET_ENGINE="null", TOKENFLEET_NULL_ENGINE_TOKENS="4",
                       TOKENFLEET_MAX_TOKENS_CAP="64", TOKENFLEET_DEFAULT_MAX_TOKENS="8",
                       **(AUTH_ENV if request.param == "auth-on" else {})) as fleet:
        yield fleet


def test_no_input_makes_the_gateway_fail(fleet: Fleet) -> None:
    schema = schemathesis.openapi.from_url(f"{fleet.url}/openapi.json")
    schema.config.base_url = fleet.url
    headers = {"Authorization": f"Bearer {KEY}"}
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/jobs"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(timeout=30, headers=headers)
            statuses[response.status_code] += 1
            if response.status_code >= 500 and not _is_documented(response):
                failures.append(f"{case.method} {case.formatted_path} -> "
                                f"{response.status_code}: {response.text[:200]}")
        fuzz()
    assert not failures, "\n".join(failures[:10])
    assert 401 not in statuses and sum(n for code, n in statuses.items() if code < 300) > 0
    with httpx.Client(base_url=fleet.url, timeout=30, headers=headers) as client:  # still fine
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        ok = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert ok.status_code == 200, ok.text


def _is_documented(response: httpx.Response) -> bool:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return (response.status_code, code) in DOCUMENTED_5XX
