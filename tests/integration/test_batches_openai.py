"""The official ``openai`` client, unchanged, runs a batch on a real fleet: redis-server,
gateway, a SmolLM2 worker and the orchestrator as processes; ``enqueue`` on the same fleet."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import DEFAULT_MODEL
from tests.integration.batch_fleet import BatchFleet, chat_lines, read_jsonl, write_jsonl
from tests.integration.fleet import make_fleet

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[BatchFleet]:
    bf = BatchFleet(make_fleet(tmp_path_factory.mktemp("openai-batch"),
                               TOKENFLEET_MAX_BATCH_SIZE="16", TOKENFLEET_BATCH_LEASE_S="2"))
    try:
        bf.fleet.start_gateway()
        bf.fleet.start_worker()
        bf.start_orchestrator()
        bf.fleet.wait_ready(1, timeout_s=300)
        yield bf
    finally:
        bf.stop()


def test_openai_client_runs_a_batch(fleet: BatchFleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    rows = chat_lines(20, max_tokens=8, model=DEFAULT_MODEL, prefix="oa")
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.bytes == len(data)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"test": "openai"})
    deadline = time.monotonic() + 600
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (20, 20)
    assert batch.error_file_id is None and batch.output_file_id
    out = read_jsonl(client.files.content(batch.output_file_id).text)
    assert sorted(r["custom_id"] for r in out) == sorted(f"oa-{i}" for i in range(20))
    for row in out:
        body = row["response"]["body"]
        assert row["response"]["status_code"] == 200
        assert body["choices"][0]["message"]["content"].strip()
        assert 0 < body["usage"]["completion_tokens"] <= 8
        assert body["usage"]["prompt_tokens"] > 0
    listed = client.batches.list(limit=5)
    assert batch.id in [b.id for b in listed.data]
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_enqueue_waits_and_writes_results(fleet: BatchFleet, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "requests.jsonl",
                       chat_lines(4, max_tokens=2, model=DEFAULT_MODEL, prefix="cli"))
    done = fleet.cli("enqueue", str(path), "--wait", "--poll", "0.3", cwd=tmp_path,
                     timeout_s=600)
    assert done.returncode == 0, done.stderr
    assert "4/4 done, 0 failed" in done.stdout + done.stderr
    rows = read_jsonl((tmp_path / "results.jsonl").read_text())
    assert sorted(r["custom_id"] for r in rows) == sorted(f"cli-{i}" for i in range(4))
    queued = fleet.cli("enqueue", str(path), "--no-wait", cwd=tmp_path)
    batch_id = queued.stdout.strip()
    fetched = fleet.cli("batch", "results", batch_id, "--wait", "--output", "again.jsonl",
                        cwd=tmp_path, timeout_s=600)
    assert fetched.returncode == 0, fetched.stderr
    assert len(read_jsonl((tmp_path / "again.jsonl").read_text())) == 4
