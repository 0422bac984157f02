"""Issue 7's chaos soak, bounded for CI: nothing lost, nothing duplicated, nothing stuck."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.soak import MEMORY_SLACK_BYTES, SoakConfig, run_soak

pytestmark = [pytest.mark.integration]


def test_chaos_soak_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    config = SoakConfig(duration_s=45.0, chaos_interval_s=3.5, num_clients=6)
    report = run_soak(config, tmp_path / "soak")
    print(report)
    # every kind of fault really happened (a busy CPU makes each take longer: once at least)
    assert min(report.kills, report.gateway_restarts, report.redis_restarts,
               report.pauses) >= 1, report
    assert report.streams_2xx >= 20 and report.jobs_2xx >= 20, report
    assert report.lost == [] and report.duplicated == [] and report.wrong_text == []
    assert report.stuck == [] and report.crashes == []
    assert report.stream_errors == [] and report.stream_mismatch == []
    assert report.max_job_overhead_bytes <= MEMORY_SLACK_BYTES, report
    assert report.stream_entries_left == 0, report
