"""``tokenfleet bench --systems features``: its flags, the request bodies it sends, the
rows it records and the cost targets computed from them (no fleet)."""

from __future__ import annotations

import argparse

import pytest

from bench import cli, features, http_load
from bench import fleet as bench_fleet
from bench.http_load import chat_body
from bench.metrics import RequestRecord, RunResult
from bench.targets import compute_targets
from bench.workload import make_requests
from gateway.schemas import ChatCompletionRequest
from gateway.structured import guided_spec
from gateway.validate import sampling_params
from shared.settings import Settings


def _bench(*argv: str) -> cli.Bench:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.Bench(parser.parse_args(list(argv)), Settings())


def test_flags_and_feature_names() -> None:
    bench = _bench("--systems", "features", "--features", "penalties,json_schema,penalties",
                   "--features-concurrency", "8")
    assert bench.systems == ["features"] and bench.args.features_concurrency == 8
    assert features.feature_names(bench.args.features) == ["none", "penalties", "json_schema"]
    assert "features" not in cli.DEFAULT_SYSTEMS
    with pytest.raises(SystemExit, match="unknown features: xml"):
        features.feature_names("xml")


@pytest.mark.parametrize("name", list(features.FEATURE_SETS))
def test_every_feature_body_is_a_valid_request(name: str) -> None:
    request = make_requests("uniform", 1, 8)[0]
    body = chat_body("m", request, features.FEATURE_SETS[name])
    assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == 8
    parsed = ChatCompletionRequest.model_validate(body)
    params = sampling_params(parsed, max_tokens=8, stop=[], vocab_size=100)
    kind, _ = guided_spec(parsed)
    assert (kind == "json_schema") == (name == "json_schema")
    assert params.has_penalties == (name == "penalties")
    assert bool(params.logit_bias) == (name == "penalties")
    assert chat_body("m", request) == chat_body("m", request, features.FEATURE_SETS["none"])


def test_run_features_records_one_row_per_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    run = _bench("--systems", "features", "--features", "json_schema", "--quick")
    sent: list[dict[str, object]] = []

    class FakeFleet:
        url, redis_url, prefix = "http://x", "redis://x", "tf"

        def __enter__(self) -> FakeFleet:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def cpu_seconds(self) -> float:
            return 0.0

    async def fake_run_http(url: str, model: str, load: object, **kw: object) -> RunResult:
        sent.append(kw["extra_body"])  # type: ignore[arg-type]
        return RunResult([RequestRecord(submitted=0.0, client=0, finished=1.0)], 1.0, None)

    monkeypatch.setattr(bench_fleet, "LocalFleet", lambda env: FakeFleet())
    monkeypatch.setattr(bench_fleet, "cores_used", lambda *a: None)
    monkeypatch.setattr(http_load, "run_http", fake_run_http)
    features.run_features(run)
    assert [r["system"] for r in run.runs] == ["features:none", "features:json_schema"]
    assert sent == [{}, features.FEATURE_SETS["json_schema"]]


def test_cost_targets_compare_with_none_of_the_same_run() -> None:
    runs = [{"system": "features:none", "concurrency": 32, "steady_tokens_per_s": 100.0,
             "output_tokens_per_s": 90.0},
            {"system": "features:json_schema", "concurrency": 32, "steady_tokens_per_s": 80.0,
             "output_tokens_per_s": 81.0},
            {"system": "features:penalties", "concurrency": 32, "steady_tokens_per_s": 96.0,
             "output_tokens_per_s": 90.0}]
    targets = {t["name"]: t for t in compute_targets(runs, {})}
    schema = targets["tok/s with json_schema on every request / none"]
    assert (schema["value"], schema["whole_run"], schema["met"]) == (0.8, 0.9, False)
    assert targets["tok/s with penalties on every request / none"]["met"] is True
