"""Files and Batch APIs in-process (gateway app + real worker loop + one orchestrator slice run
directly): uploads, limits, owners, and every kind of bad input failing before anything
is queued."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from batches.files import FileStore
from batches.worker import run_batch
from shared.keys import LANES, Keys
from shared.settings import Settings
from tests.support.gateway import gateway_client
from tests.support.model import tiny_model_info
from tests.support.worker import RunningWorker, running_worker

pytestmark = pytest.mark.integration

PREFIX = "tftest"
KEYS = Keys(PREFIX)
KEY_A, KEY_B = "sk-alice-0123456789", "sk-bob-0123456789"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, auth=True,
                    api_keys=[KEY_A, KEY_B], max_file_bytes=4096, max_tokens_cap=64)


@pytest.fixture
async def app_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    async with gateway_client(settings) as pair:
        yield pair


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[RunningWorker]:
    async with running_worker(settings, tiny_model_info()) as handle:
        yield handle


def line(custom_id: str, body: dict[str, Any] | None = None,
         url: str = "/v1/chat/completions") -> str:
    body = body or {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


async def upload(client: httpx.AsyncClient, text: str | bytes,
                 headers: dict[str, str] = A) -> httpx.Response:
    data = text.encode() if isinstance(text, str) else text
    return await client.post("/v1/files", headers=headers, data={"purpose": "batch"},
                             files={"file": ("in.jsonl", data, "application/jsonl")})


async def create(client: httpx.AsyncClient, file_id: str, **extra: Any) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h", **extra}
    return await client.post("/v1/batches", headers=A, json=body)


async def run_to_end(app: FastAPI, batch_id: str) -> str:
    """Run orchestrator slices in-process until the batch ends (Retry = next slice)."""
    from arq.worker import Retry

    gw = app.state.gateway
    ctx = {"gw": gw, "files": FileStore(gw.redis, gw.keys, gw.settings.file_ttl_s),
           "job_id": KEYS.batch(batch_id)}
    for _ in range(50):
        try:
            return await run_batch(ctx, batch_id)
        except Retry:
            continue
    raise AssertionError("the batch did not end in 50 slices")


async def test_files_upload_read_list_delete_and_owners(app_client: Any) -> None:
    client, _ = app_client
    text = line("a") + "\n" + line("b") + "\n"
    response = await upload(client, text)
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["object"] == "file" and file["purpose"] == "batch"
    assert file["bytes"] == len(text) and file["filename"] == "in.jsonl"
    assert (await client.get(f"/v1/files/{file['id']}", headers=A)).json() == file
    content = await client.get(f"/v1/files/{file['id']}/content", headers=A)
    assert content.text == text
    listed = (await client.get("/v1/files", headers=A)).json()
    assert [f["id"] for f in listed["data"]] == [file["id"]]
    # another key sees nothing of it
    assert (await client.get(f"/v1/files/{file['id']}", headers=B)).status_code == 404
    assert (await client.get(f"/v1/files/{file['id']}/content", headers=B)).status_code == 404
    assert (await client.delete(f"/v1/files/{file['id']}", headers=B)).status_code == 404
    assert (await client.get("/v1/files", headers=B)).json()["data"] == []
    deleted = await client.delete(f"/v1/files/{file['id']}", headers=A)
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    assert (await client.get(f"/v1/files/{file['id']}", headers=A)).status_code == 404


async def test_upload_refusals_leave_nothing(app_client: Any, redis: aioredis.Redis) -> None:
    client, _ = app_client
    too_big = await upload(client, b"x" * 5000)
    assert too_big.status_code == 413
    assert "4096 bytes" in too_big.json()["error"]["message"]
    empty = await upload(client, b"")
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    purpose = await client.post("/v1/files", headers=A, data={"purpose": "fine-tune"},
                                files={"file": ("a.jsonl", b"{}\n")})
    assert purpose.status_code == 400 and "purpose" in purpose.json()["error"]["message"]
    assert await redis.keys(f"{PREFIX}:file:*") == []


async def test_batch_create_refusals(app_client: Any, worker: RunningWorker) -> None:
    client, _ = app_client
    file_id = (await upload(client, line("a") + "\n")).json()["id"]
    window = await create(client, file_id, completion_window="1h")
    assert window.status_code == 400
    assert "completion_window must be \"24h\"" in window.json()["error"]["message"]
    endpoint = await client.post("/v1/batches", headers=A, json={
        "input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"})
    assert endpoint.status_code == 400 and "/v1/completions" in endpoint.text
    missing = await create(client, "file-nope")
    assert missing.status_code == 404
    other = await client.post("/v1/batches", headers=B, json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert other.status_code == 404


BAD_INPUTS = [
    ("not json", f"{line('a')}\n{{oops\n", 2, "invalid_json_line", "not valid JSON"),
    ("no custom_id", json.dumps({"method": "POST", "url": "/v1/chat/completions",
                                 "body": {}}) + "\n", 1, "missing_required_parameter",
     "custom_id is required"),
    ("duplicate", f"{line('a')}\n{line('b')}\n{line('a')}\n", 3, "duplicate_custom_id",
     "custom_id 'a' is used by an earlier line"),
    ("unknown url", line("a", url="/v1/embeddings") + "\n", 1, "invalid_url",
     "url '/v1/embeddings' is not supported"),
    ("body schema", line("a", {"model": "tiny", "temperature": 5,
                               "messages": [{"role": "user", "content": "hi"}]}) + "\n", 1,
     "invalid_request", "invalid request: temperature: Input should be less than or equal to 2"),
    ("max_tokens", f"{line('a')}\n" + line("b", {
        "model": "tiny", "max_tokens": 100000,
        "messages": [{"role": "user", "content": "hi"}]}) + "\n", 2, "invalid_request",
     "max_tokens"),
    ("unknown model", line("a", {"model": "gpt-9", "messages": [
        {"role": "user", "content": "hi"}]}) + "\n", 1, "invalid_request",
     "model 'gpt-9' is not served here"),
    ("blank only", "\n  \n", 0, "empty_file", "no request lines"),
]


@pytest.mark.parametrize(("case", "text", "line_no", "code", "message"), BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
async def test_bad_input_fails_the_batch_before_anything_runs(
        app_client: Any, worker: RunningWorker, redis: aioredis.Redis, case: str, text: str,
        line_no: int, code: str, message: str) -> None:
    client, app = app_client
    file_id = (await upload(client, text)).json()["id"]
    batch = (await create(client, file_id)).json()
    assert batch["status"] == "validating"
    assert await run_to_end(app, batch["id"]) == "failed"
    failed = (await client.get(f"/v1/batches/{batch['id']}", headers=A)).json()
    assert failed["status"] == "failed" and failed["failed_at"] is not None
    errors = failed["errors"]["data"]
    assert [(e["line"], e["code"]) for e in errors] == [(line_no, code)], errors
    assert message in errors[0]["message"] and errors[0]["message"].startswith(
        f"line {line_no}: ")
    assert failed["output_file_id"] is None
    for lane in LANES:  # nothing was queued
        assert await redis.xlen(KEYS.requests_stream("tiny", lane)) == 0
    assert worker.served == []


async def test_small_batch_runs_and_owners_see_only_theirs(app_client: Any,
                                                            worker: RunningWorker) -> None:
    client, app = app_client
    text = "".join(line(f"id-{i}") + "\n" for i in range(5))
    file_id = (await upload(client, text)).json()["id"]
    first = (await create(client, file_id, metadata={"k": "v"})).json()
    second = (await create(client, file_id)).json()
    assert await run_to_end(app, first["id"]) == "completed"
    done = (await client.get(f"/v1/batches/{first['id']}", headers=A)).json()
    assert done["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert done["metadata"] == {"k": "v"} and done["completed_at"] is not None
    assert done["usage"]["output_tokens"] == 5 * 4
    output = (await client.get(f"/v1/files/{done['output_file_id']}/content",
                               headers=A)).text.splitlines()
    rows = [json.loads(r) for r in output]
    assert [r["custom_id"] for r in rows] == [f"id-{i}" for i in range(5)]
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] == "Hello, world!"
               for r in rows)
    listed = (await client.get("/v1/batches", headers=A)).json()
    assert [b["id"] for b in listed["data"]] == [second["id"], first["id"]]
    page = (await client.get("/v1/batches", headers=A, params={"limit": 1})).json()
    assert page["has_more"] and page["last_id"] == second["id"]
    assert (await client.get(f"/v1/batches/{first['id']}", headers=B)).status_code == 404
    assert (await client.post(f"/v1/batches/{first['id']}/cancel",
                              headers=B)).status_code == 404
    assert (await client.get("/v1/batches", headers=B)).json()["data"] == []
    late = await client.post(f"/v1/batches/{first['id']}/cancel", headers=A)
    assert late.status_code == 409
