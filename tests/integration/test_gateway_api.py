"""The OpenAI endpoints against a real Redis and the real worker loop (a scripted stand-in
model, tests/support/worker.py): shapes, streams, 4xx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.keys import LANES, Keys
from shared.settings import Settings
from tests.support.gateway import gateway_client, parse_sse
from tests.support.model import tiny_model_info
from tests.support.worker import RunningWorker, register_worker, running_worker

PREFIX = "tftest"
KEYS = Keys(PREFIX)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}]}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, key_prefix=PREFIX, max_body_bytes=16_384,
                    default_max_tokens=16, max_tokens_cap=200)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(settings) as (http, _):
        yield http


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[RunningWorker]:
    async with running_worker(settings, tiny_model_info()) as running:
        yield running


async def queued(redis: aioredis.Redis) -> int:
    total = 0
    for lane in LANES:
        total += await redis.xlen(KEYS.requests_stream("tiny", lane))
    return total + len(await redis.keys(f"{PREFIX}:job:*"))


# --- health and models ----------------------------------------------------------------------


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_without_workers_is_503(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "reason": "no live worker"}


async def test_readyz_cold_worker_is_503_warm_is_200(client: httpx.AsyncClient,
                                                     settings: Settings) -> None:
    register_worker(settings, tiny_model_info(), "w1", is_warm=False)
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert "warming" in response.json()["reason"]
    register_worker(settings, tiny_model_info(), "w2")
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_models_lists_live_workers_only(client: httpx.AsyncClient, redis: aioredis.Redis,
                                              settings: Settings, worker: RunningWorker) -> None:
    register_worker(settings, tiny_model_info(name="old"), "stale")
    await redis.zadd(KEYS.workers, {"stale": 1.0})  # last heartbeat long ago
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model"
    assert (await client.get("/v1/models/tiny")).status_code == 200
    assert (await client.get("/v1/models/old")).status_code == 404


# --- answers --------------------------------------------------------------------------------


async def test_chat_completion_shape(client: httpx.AsyncClient, worker: RunningWorker) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny"
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Hello, world!"}}]
    usage = body["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4


async def test_completion_shape_and_length_finish(client: httpx.AsyncClient,
                                                  worker: RunningWorker) -> None:
    body = {"model": "tiny", "prompt": ["Once upon"], "max_tokens": 2}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "Hello,"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["prompt_tokens"] == len(b"Once upon")


async def test_chat_stream_sse_sequence(client: httpx.AsyncClient, worker: RunningWorker) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello, world!"
    final, usage_chunk = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4


async def test_completion_stream_without_usage(client: httpx.AsyncClient,
                                               worker: RunningWorker) -> None:
    body = {"model": "tiny", "prompt": "Hi", "stream": True}
    response = await client.post("/v1/completions", json=body)
    events = parse_sse(response.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, world!"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_worker_error_non_stream_and_stream(client: httpx.AsyncClient,
                                                  worker: RunningWorker) -> None:
    body = {"model": "tiny", "prompt": "please FAIL"}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 500
    assert "the fake model failed" in response.json()["error"]["message"]
    response = await client.post("/v1/completions", json={**body, "stream": True})
    events = parse_sse(response.text)
    assert events[-1] == (None, "[DONE]")
    error = json.loads(events[-2][1])["error"]
    assert error["message"] == "the fake model failed"
    assert error["type"] == "server_error"


async def test_restart_resets_text(client: httpx.AsyncClient, worker: RunningWorker) -> None:
    body = {"model": "tiny", "prompt": "RESTART me"}
    response = await client.post("/v1/completions", json=body)
    assert response.json()["choices"][0]["text"] == "Hello, world!"
    response = await client.post("/v1/completions", json={**body, "stream": True})
    events = parse_sse(response.text)
    names = [name for name, _ in events]
    assert names.count("restart") == 1
    restart = json.loads(events[names.index("restart")][1])
    assert restart["restart"] is True
    before = [json.loads(d)["choices"][0]["text"] for n, d in events[:names.index("restart")]]
    assert before == ["partial"]


async def test_stop_and_lane_reach_the_worker(client: httpx.AsyncClient, redis: aioredis.Redis,
                                              worker: RunningWorker) -> None:
    body = {**CHAT, "stop": "x", "temperature": 0, "top_k": 5, "seed": 7, "priority": "batch",
            "max_completion_tokens": 3}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert await redis.xlen(KEYS.requests_stream("tiny", "batch")) == 1
    assert response.json()["usage"]["completion_tokens"] == 3


# --- rejected requests leave nothing behind -------------------------------------------------


def _long_prompt() -> str:
    return "x" * 300  # the tiny model has 256 tokens of context, one token per byte


BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("chat", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages must not be empty"),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400,
     "prompt must not be empty"),
    ("max_tokens 0", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400,
     "max_tokens must be at least 1"),
    ("max_tokens over cap", "/v1/completions", {"model": "tiny", "prompt": "a",
                                                "max_tokens": 500}, 400, "at most 200"),
    ("max_tokens over context", "/v1/completions",
     {"model": "tiny", "prompt": "a" * 100, "max_tokens": 200}, 400,
     "the prompt has 100 tokens and the model's context is 256 tokens, so max_tokens must be "
     "<= 156"),
    ("prompt over context", "/v1/completions", {"model": "tiny", "prompt": _long_prompt()}, 400,
     "prompt is 300 tokens, longer than the model's context of 256"),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404,
     "available models: tiny"),
    ("wrong type", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("temperature range", "/v1/chat/completions", {**CHAT, "temperature": 3}, 400,
     "temperature"),
    ("top_p range", "/v1/completions", {"model": "tiny", "prompt": "a", "top_p": 0}, 400,
     "top_p"),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400,
     "messages: this field is required"),
    ("n=2 on a job", "/v1/jobs", {"prompt": "hi", "n": 2}, 400, "not for jobs or batches"),
    ("top_logprobs alone", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs: true"),
    ("bad schema", "/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, 400,
     "not a valid JSON Schema"),
    ("several prompts", "/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400,
     "several prompts"),
    ("token prompt", "/v1/completions", {"model": "tiny", "prompt": [1, 2]}, 400,
     "token ids"),
    ("too many stops", "/v1/completions", {"model": "tiny", "prompt": "a",
                                           "stop": ["s"] * 9}, 400, "at most 8 stop"),
    ("long stop", "/v1/completions", {"model": "tiny", "prompt": "a", "stop": "s" * 65}, 400,
     "at most 64 characters"),
    ("image part", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text content parts"),
    ("template rejects", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "must not start with an assistant"),
    ("not an object", "/v1/chat/completions", [1, 2], 400, "invalid request"),
    # numbers the worker (msgpack: int64, the engine: int32) cannot take: 400 naming them
    ("huge top_k", "/v1/completions", {"model": "tiny", "prompt": "a", "top_k": 2**70}, 400,
     "top_k: Input should be less than or equal to 2147483647"),
    ("huge seed", "/v1/completions", {"model": "tiny", "prompt": "a", "seed": 2**70}, 400,
     "seed: Input should be less than or equal to"),
    ("huge min_tokens", "/v1/completions", {"model": "tiny", "prompt": "a",
                                            "min_tokens": 2**70}, 400, "min_tokens"),
    ("huge max_tokens", "/v1/completions", {"model": "tiny", "prompt": "a",
                                            "max_tokens": 2**70}, 400, "at most 200"),
    ("huge max_completion_tokens", "/v1/chat/completions",
     {**CHAT, "max_completion_tokens": 2**70}, 400, "at most 200"),
    ("huge stop token id", "/v1/completions", {"model": "tiny", "prompt": "a",
                                               "stop_token_ids": [2**70]}, 400,
     "is not a token id of this model"),
    ("many stop token ids", "/v1/completions", {"model": "tiny", "prompt": "a",
                                                "stop_token_ids": [1] * 65}, 400,
     "at most 64 stop_token_ids"),
    ("huge timeout", "/v1/completions", {"model": "tiny", "prompt": "a", "timeout": 1e300},
     400, "timeout"),
    ("huge n", "/v1/chat/completions", {**CHAT, "n": 2**70}, 400, "n must be 1 to 16"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "message"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
async def test_rejected_request_enqueues_nothing(client: httpx.AsyncClient,
                                                 redis: aioredis.Redis, worker: RunningWorker,
                                                 name: str, path: str, body: Any, status: int,
                                                 message: str) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None or status == 404 or name == "not an object"
    assert "Traceback" not in response.text
    assert await queued(redis) == 0
    assert worker.served == []


async def test_malformed_json_is_400(client: httpx.AsyncClient, redis: aioredis.Redis,
                                     worker: RunningWorker) -> None:
    response = await client.post("/v1/chat/completions", content=b'{"model": "tiny",',
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "request body is not valid JSON"
    assert await queued(redis) == 0


async def test_body_without_content_type_is_read_as_json(client: httpx.AsyncClient,
                                                         worker: RunningWorker) -> None:
    response = await client.post("/v1/chat/completions", content=json.dumps(CHAT).encode())
    assert response.status_code == 200, response.text


async def test_body_too_large_is_413(client: httpx.AsyncClient, redis: aioredis.Redis,
                                     worker: RunningWorker) -> None:
    big = {"model": "tiny", "prompt": "a" * 20_000}
    response = await client.post("/v1/completions", json=big)
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(5):
            yield b"a" * 5000
        yield b'"}'

    response = await client.post("/v1/completions", content=chunks())
    assert response.status_code == 413
    assert await queued(redis) == 0


async def test_unknown_route_is_openai_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_unexpected_error_is_generic_500(settings: Settings) -> None:
    async with gateway_client(settings) as (http, app):
        async def boom() -> None:
            raise RuntimeError("secret internals")

        app.add_api_route("/boom", boom)
        response = await http.get("/boom")
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal server error"
    assert "secret" not in response.text
