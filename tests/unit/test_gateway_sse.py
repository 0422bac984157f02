"""The OpenAI stream of a request's events, and response bodies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from gateway.errors import GatewayTimeoutError, QueueTimeoutError, describe
from gateway.generation import collect
from gateway.openai_format import OpenAIFormat, Outcome
from gateway.reader import _Cursor, _text_catch_up
from gateway.sse import DONE, KEEPALIVE, EventStreamResponse, StreamCloser, openai_stream
from shared.protocol import (
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_RESTART,
    EVENT_START,
    EVENT_TOKEN,
    TokenEvent,
)
from tests.support.gateway import parse_sse


async def from_list(events: list[TokenEvent], fail: Exception | None = None
                    ) -> AsyncIterator[TokenEvent]:
    for event in events:
        yield event
    if fail is not None:
        raise fail


async def run(events: AsyncIterator[TokenEvent], kind: str = "chat", usage: bool = False
              ) -> tuple[list[tuple[str | None, str]], list[bool]]:
    closed: list[bool] = []
    fmt = OpenAIFormat(kind=kind, id="chatcmpl-1", model="m", created=1,  # type: ignore[arg-type]
                       include_usage=usage)
    body = b"".join([chunk async for chunk in openai_stream(
        events, fmt, request_id="chatcmpl-1", prompt_tokens=5, on_close=closed.append)])
    return parse_sse(body.decode()), closed


async def test_chat_stream_with_restart_and_usage() -> None:
    events = [TokenEvent("r", 0, EVENT_START), TokenEvent("r", 1, EVENT_TOKEN, text="old"),
              TokenEvent("r", 2, EVENT_RESTART), TokenEvent("r", 3, EVENT_TOKEN, text="new"),
              TokenEvent("r", 4, EVENT_TOKEN, text=""),
              TokenEvent("r", 5, EVENT_DONE, finish_reason="length", completion_tokens=2)]
    sse, closed = await run(from_list(events), usage=True)
    assert closed == [True]
    assert [name for name, _ in sse] == [None, None, "restart", None, None, None, None]
    role, old, restart, new, final, usage, done = sse
    assert json.loads(role[1])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(old[1])["choices"][0]["delta"] == {"content": "old"}
    assert json.loads(restart[1])["restart"] is True
    assert json.loads(new[1])["usage"] is None
    assert json.loads(final[1])["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                  "finish_reason": "length"}
    assert json.loads(usage[1])["usage"] == {"prompt_tokens": 5, "completion_tokens": 2,
                                             "total_tokens": 7}
    assert done == (None, "[DONE]")


async def test_error_event_and_raised_errors_end_the_stream() -> None:
    sse, closed = await run(from_list([TokenEvent("r", 0, EVENT_ERROR, error="oom")]),
                            kind="completion")
    assert json.loads(sse[0][1])["error"]["message"] == "oom"
    assert sse[-1] == (None, "[DONE]") and closed == [True]
    sse, closed = await run(from_list([], fail=GatewayTimeoutError("late")))
    assert json.loads(sse[-2][1])["error"]["code"] == "timeout"
    sse, _ = await run(from_list([]))
    assert "ended without a result" in sse[-2][1]


async def test_abandoned_stream_reports_unfinished() -> None:
    closed: list[bool] = []
    fmt = OpenAIFormat(kind="chat", id="x", model="m", created=1)
    events = from_list([TokenEvent("x", 0, EVENT_TOKEN, text="a")])
    stream = openai_stream(events, fmt, request_id="x", prompt_tokens=1, on_close=closed.append)
    await stream.__anext__()
    await stream.aclose()
    assert closed == [False]


def test_stream_closer_runs_once() -> None:
    calls: list[bool] = []
    closer = StreamCloser(calls.append)
    closer(True)
    closer(False)
    assert calls == [True]


def test_response_bodies() -> None:
    outcome = Outcome(text="hi", finish_reason="stop", prompt_tokens=3, completion_tokens=1)
    chat = OpenAIFormat(kind="chat", id="c", model="m", created=9).response(outcome)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    text = OpenAIFormat(kind="completion", id="c", model="m", created=9).response(outcome)
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"] == "hi"
    assert text["usage"]["total_tokens"] == 4


async def test_a_queue_timeout_is_its_own_error_code() -> None:
    event = TokenEvent("r", 0, EVENT_ERROR, finish_reason="timeout", error="timed out in queue")
    sse, _ = await run(from_list([event]))
    error = json.loads(sse[-2][1])["error"]
    assert (error["code"], error["type"]) == ("queue_timeout", "timeout_error")
    with pytest.raises(QueueTimeoutError):
        await collect(from_list([event]), prompt_tokens=1)
    status, body = describe(QueueTimeoutError("late"))
    assert (status, body["error"]["code"]) == (504, "queue_timeout")


async def test_keep_alive_comments_while_no_event_arrives() -> None:
    release = asyncio.Event()

    async def slow() -> AsyncIterator[TokenEvent]:
        yield TokenEvent("r", 0, EVENT_TOKEN, text="a")
        await release.wait()
        yield TokenEvent("r", 1, EVENT_TOKEN, text="b")
        yield TokenEvent("r", 2, EVENT_DONE, finish_reason="stop")

    fmt = OpenAIFormat(kind="completion", id="r", model="m", created=1)
    chunks: list[bytes] = []
    async for chunk in openai_stream(slow(), fmt, request_id="r", prompt_tokens=1,
                                     on_close=lambda finished: None, keepalive_s=0.01):
        chunks.append(chunk)
        if chunk == KEEPALIVE:
            release.set()  # the event waited for arrives after a keep-alive: none is lost
    assert KEEPALIVE in chunks
    body = b"".join(c for c in chunks if c != KEEPALIVE).decode()
    texts = [json.loads(d)["choices"][0]["text"] for _, d in parse_sse(body)[:-1]]
    assert texts == ["a", "b", ""]


async def test_job_stream_events_carry_their_seq_as_id() -> None:
    events = [TokenEvent("j", 0, EVENT_START), TokenEvent("j", 1, EVENT_TOKEN, text="x"),
              TokenEvent("j", 2, EVENT_RESTART), TokenEvent("j", 3, EVENT_TOKEN, text="y"),
              TokenEvent("j", 4, EVENT_DONE, finish_reason="stop")]
    fmt = OpenAIFormat(kind="chat", id="j", model="m", created=1, include_usage=True)
    body = b"".join([c async for c in openai_stream(
        from_list(events), fmt, request_id="j", prompt_tokens=1, on_close=lambda f: None,
        with_ids=True, is_resumed=True)]).decode()
    ids = [line for line in body.split("\n") if line.startswith("id:")]
    assert ids == ["id: 1", "id: 2", "id: 3", "id: 4", "id: 4", "id: 4"]
    assert '"role"' not in body  # a resumed stream does not repeat the role chunk


def test_catch_up_from_the_text_of_a_compacted_job() -> None:
    fresh = _Cursor(-1, [])
    assert [e.text for e in _text_catch_up("j", fresh, "abc")] == ["abc"]
    partly = _Cursor(5, ["a", "b"])
    assert [(e.seq, e.text) for e in _text_catch_up("j", partly, "abc")] == [(6, "c")]
    unknown = _Cursor(5, None)
    assert [e.type for e in _text_catch_up("j", unknown, "abc")] == [EVENT_RESTART, EVENT_TOKEN]
    assert _text_catch_up("j", _Cursor(-1, []), "") == []


@pytest.mark.parametrize("keepalive_s", [None, 0.01])
async def test_closing_a_stream_stops_its_pending_read_at_once(keepalive_s: float | None) -> None:
    is_closed = asyncio.Event()

    async def endless() -> AsyncIterator[TokenEvent]:
        try:
            yield TokenEvent("r", 0, EVENT_TOKEN, text="a")
            await asyncio.Event().wait()
            yield TokenEvent("r", 1, EVENT_TOKEN, text="never")
        finally:
            is_closed.set()

    fmt = OpenAIFormat(kind="completion", id="r", model="m", created=1)
    closed: list[bool] = []
    stream = openai_stream(endless(), fmt, request_id="r", prompt_tokens=1,
                           on_close=closed.append, keepalive_s=keepalive_s)
    assert b'"a"' in await stream.__anext__()
    if keepalive_s is not None:
        assert await stream.__anext__() == KEEPALIVE  # a read of the next event is pending
    await stream.aclose()
    assert is_closed.is_set() and closed == [False]


async def test_events_that_arrived_together_are_written_as_one_block() -> None:
    arrived = asyncio.Event()

    async def two_steps() -> AsyncIterator[TokenEvent]:
        yield TokenEvent("r", 0, EVENT_START)
        yield TokenEvent("r", 1, EVENT_TOKEN, text="a")
        yield TokenEvent("r", 2, EVENT_TOKEN, text="b")
        await arrived.wait()  # the next step's events arrive later, together
        yield TokenEvent("r", 3, EVENT_TOKEN, text="c")
        yield TokenEvent("r", 4, EVENT_DONE, finish_reason="stop")

    fmt = OpenAIFormat(kind="chat", id="r", model="m", created=1)
    chunks: list[bytes] = []
    async for chunk in openai_stream(two_steps(), fmt, request_id="r", prompt_tokens=1,
                                     on_close=lambda finished: None):
        chunks.append(chunk)
        arrived.set()
    assert len(chunks) == 2  # role + a + b, then c + final chunk + [DONE]
    first = [json.loads(d)["choices"][0]["delta"] for _, d in parse_sse(chunks[0].decode())]
    assert first == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}]
    assert chunks[1].startswith(b'data: {"id":"r"') and chunks[1].endswith(b"data: [DONE]\n\n")
    second = [d for _, d in parse_sse(chunks[1].decode())]
    assert json.loads(second[0])["choices"][0]["delta"] == {"content": "c"}
    assert second[-1] == "[DONE]"


def test_token_chunks_from_the_template_match_the_full_encoding() -> None:
    for kind in ("chat", "completion"):
        for usage in (False, True):
            fast = OpenAIFormat(kind=kind, id='i"d', model="m\u00e9", created=3,  # type: ignore[arg-type]
                                include_usage=usage)
            full = OpenAIFormat(kind=kind, id='i"d', model="m\u00e9", created=3,  # type: ignore[arg-type]
                                include_usage=usage)
            for text in ["x", ' "q"\n', "\u00e9\U0001f600", "\\", '"content":""']:
                assert fast.delta_json(text) == json.dumps(
                    full.delta_chunk(text), separators=(",", ":"), ensure_ascii=False).encode()


async def test_the_done_block_ends_the_response_body() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"
        yield b"data: {}\n\n" + DONE
        raise AssertionError("not read past [DONE]")

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()
        return {}

    closed: list[bool] = []
    response = EventStreamResponse(body(), StreamCloser(closed.append))
    await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["more_body"] for m in bodies] == [True, False]  # no empty closing write
    assert bodies[-1]["body"].endswith(DONE) and closed == [False]  # type: ignore[union-attr]
