"""The body-size middleware and the job view, on plain ASGI calls."""

from __future__ import annotations

import json
from typing import Any

from gateway.jobs import job_view
from gateway.middleware import BodyLimitMiddleware


class Recorder:
    def __init__(self) -> None:
        self.body = b""
        self.headers: list[tuple[bytes, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.headers = scope["headers"]
        self.body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
               ) -> list[dict[str, Any]]:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    await BodyLimitMiddleware(app, max_body_bytes=10)(scope, receive, send)
    return sent


async def test_small_body_passes_whole_and_defaults_to_json() -> None:
    app = Recorder()
    sent = await call(app, [b"12345", b"67890"], [])
    assert sent[0]["status"] == 200
    assert app.body == b"1234567890"
    assert (b"content-type", b"application/json") in app.headers


async def test_body_over_the_limit_is_413() -> None:
    for chunks, headers in [([b"x"], [(b"content-length", b"11")]),
                            ([b"123456", b"78901"], [])]:
        app = Recorder()
        sent = await call(app, chunks, headers)
        assert sent[0]["status"] == 413
        assert "larger than the limit of 10 bytes" in json.loads(sent[1]["body"])["error"][
            "message"]
        assert app.body == b""


def test_job_view_timings() -> None:
    fields = {b"status": b"succeeded", b"created_at": b"100.0", b"started_at": b"100.5",
              b"first_token_at": b"101.0", b"finished_at": b"102.0", b"prompt_tokens": b"3",
              b"completion_tokens": b"4", b"finish_reason": b"stop", b"error": b""}
    view = job_view("job-1", fields, "text")
    assert view["timings"] == {"queue_s": 0.5, "ttft_s": 1.0, "total_s": 2.0}
    assert (view["status"], view["error"], view["completion_tokens"]) == ("succeeded", None, 4)
    queued = job_view("job-2", {b"status": b"queued", b"created_at": b"1"}, "")
    assert queued["timings"] == {"queue_s": None, "ttft_s": None, "total_s": None}
