"""Batches on a real fleet of processes (redis, gateway, null-engine worker, orchestrator):
the enqueue CLI, kill -9 of the orchestrator mid-batch, cancel, interactive TTFT."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration import waiting
from tests.integration.batch_fleet import (
    KEYS,
    MODEL,
    BatchFleet,
    backlog,
    chat_lines,
    make_batch_fleet,
    read_jsonl,
    write_jsonl,
)

pytestmark = pytest.mark.integration

STEP_DELAY_S = 0.02  # null engine: 16 tokens -> ~0.35 s a request
BATCH_SIZE = 4  # worker rows: a 40-line batch takes ~3.5 s
TTFT_BOUND_S = 1.0  # interactive TTFT while a batch keeps the worker full (measured ~0.1 s)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchFleet]:
    tmp = tmp_path_factory.mktemp("batchfleet")
    bf = make_batch_fleet(tmp, TOKENFLEET_MAX_BATCH_SIZE=str(BATCH_SIZE),
                          TOKENFLEET_MAX_WAITING="4", TOKENFLEET_BATCH_MAX_IN_FLIGHT="8")
    try:
        bf.fleet.start_gateway()
        bf.start_slow_worker(STEP_DELAY_S)
        bf.start_orchestrator()
        bf.fleet.wait_ready(1, timeout_s=60)
        yield bf
    finally:
        bf.stop()


def api(fleet: BatchFleet) -> httpx.Client:
    return httpx.Client(base_url=fleet.url, timeout=30)


def submit(fleet: BatchFleet, rows: list[dict[str, Any]]) -> str:
    with api(fleet) as http:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        file = http.post("/v1/files", data={"purpose": "batch"},
                         files={"file": ("in.jsonl", data)}).json()
        batch = http.post("/v1/batches", json={"input_file_id": file["id"],
                                               "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"}).json()
    return str(batch["id"])


def status(fleet: BatchFleet, batch_id: str) -> dict[str, Any]:
    with api(fleet) as http:
        result: dict[str, Any] = http.get(f"/v1/batches/{batch_id}").json()
        return result


def wait_status(fleet: BatchFleet, batch_id: str, wanted: str,
                timeout_s: float = 60) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(status(fleet, batch_id))
        return found["status"] == wanted

    waiting.wait_for(reached, timeout_s, interval_s=0.1)
    return found


def content(fleet: BatchFleet, file_id: str) -> list[dict[str, Any]]:
    with api(fleet) as http:
        return read_jsonl(http.get(f"/v1/files/{file_id}/content").text)


def num_results(fleet: BatchFleet, batch_id: str) -> int:
    with fleet.redis() as client:
        return int(client.hlen(KEYS.batch_results(batch_id)))


def test_enqueue_no_wait_then_batch_results(fleet: BatchFleet, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "requests.jsonl", chat_lines(12, prefix="cli"))
    queued = fleet.cli("enqueue", str(path), "--no-wait", cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr
    batch_id = queued.stdout.strip()
    assert batch_id.startswith("batch_")
    results = fleet.cli("batch", "results", batch_id, "--wait", cwd=tmp_path)
    assert results.returncode == 0, results.stderr
    rows = read_jsonl((tmp_path / "results.jsonl").read_text())
    assert sorted(r["custom_id"] for r in rows) == sorted(f"cli-{i}" for i in range(12))
    assert all(r["response"]["status_code"] == 200 for r in rows)
    assert not (tmp_path / "errors.jsonl").exists()
    shown = fleet.cli("batch", "status", batch_id, cwd=tmp_path)
    assert json.loads(shown.stdout)["request_counts"]["completed"] == 12
    listed = fleet.cli("batch", "list", cwd=tmp_path)
    assert batch_id in listed.stdout and "completed" in listed.stdout


def test_enqueue_refuses_a_bad_file_locally(fleet: BatchFleet, tmp_path: Path) -> None:
    rows = chat_lines(3)
    rows[1]["custom_id"] = rows[0]["custom_id"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    refused = fleet.cli("enqueue", str(path), "--no-wait", cwd=tmp_path)
    assert refused.returncode == 1
    assert "line 2: custom_id 'req-0' is used by an earlier line" in refused.stderr
    with api(fleet) as http:
        assert http.get("/v1/files").json()["data"] == [] or all(
            f["filename"] != "bad.jsonl" for f in http.get("/v1/files").json()["data"])


def test_kill_9_orchestrator_mid_batch_then_restart(fleet: BatchFleet) -> None:
    batch_id = submit(fleet, chat_lines(40, prefix="kill"))
    waiting.wait_for(lambda: num_results(fleet, batch_id) >= 8, 60)
    victim = fleet.orchestrators[-1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done_at_kill = num_results(fleet, batch_id)
    assert done_at_kill < 40, "the batch finished before the kill: slow the worker down"
    with fleet.redis() as client:
        assert client.hlen(KEYS.batch_inflight(batch_id)) > 0  # killed with work in flight
    restarted_at = time.monotonic()
    fleet.start_orchestrator()
    waiting.wait_for(lambda: num_results(fleet, batch_id) > done_at_kill, 20)
    resumed_s = time.monotonic() - restarted_at
    print(f"resumed {resumed_s:.2f} s after the restart ({done_at_kill}/40 done at the kill)")
    done = wait_status(fleet, batch_id, "completed")
    assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    ids = [r["custom_id"] for r in content(fleet, done["output_file_id"])]
    assert sorted(ids) == sorted(f"kill-{i}" for i in range(40))  # each exactly once
    assert done["error_file_id"] is None
    assert resumed_s < 15, f"resumed {resumed_s:.1f} s after the restart"


def test_cancel_mid_batch(fleet: BatchFleet) -> None:
    batch_id = submit(fleet, chat_lines(40, prefix="cancel"))
    waiting.wait_for(lambda: num_results(fleet, batch_id) >= 4, 60)
    with api(fleet) as http:
        cancelling = http.post(f"/v1/batches/{batch_id}/cancel").json()
    assert cancelling["status"] in ("cancelling", "cancelled")
    done = wait_status(fleet, batch_id, "cancelled", 45)
    assert done["cancelled_at"] is not None
    completed = done["request_counts"]["completed"]
    assert 4 <= completed < 40
    ids = [r["custom_id"] for r in content(fleet, done["output_file_id"])]
    assert len(ids) == len(set(ids)) == completed
    assert set(ids) <= {f"cancel-{i}" for i in range(40)}
    with fleet.redis() as client:
        waiting.wait_for(lambda: backlog(client) == 0, 20)  # nothing left queued or running
        assert client.hlen(KEYS.batch_inflight(batch_id)) == 0


def test_interactive_ttft_stays_low_during_a_batch(fleet: BatchFleet) -> None:
    batch_id = submit(fleet, chat_lines(120, max_tokens=16, prefix="busy"))
    wait_status(fleet, batch_id, "in_progress")
    with fleet.redis() as client:
        waiting.wait_for(lambda: backlog(client) >= BATCH_SIZE + 2, 20)  # worker is full
    ttfts = []
    body = {"model": MODEL, "messages": [{"role": "user", "content": "now"}],
            "max_tokens": 4, "stream": True}
    with api(fleet) as http:
        for _ in range(5):
            started = time.monotonic()
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                for text in response.iter_lines():
                    if '"content"' in text and '"content":""' not in text:
                        ttfts.append(time.monotonic() - started)
                        break
        http.post(f"/v1/batches/{batch_id}/cancel")
    assert status(fleet, batch_id)["status"] in ("cancelling", "cancelled", "in_progress")
    assert len(ttfts) == 5
    print("interactive TTFT during the batch (s):", [round(t, 3) for t in ttfts])
    assert max(ttfts) < TTFT_BOUND_S, f"interactive TTFTs during the batch: {ttfts}"
    wait_status(fleet, batch_id, "cancelled", 45)
