"""The HTTP load generator against a tiny fake SSE server: chunk parsing, TTFT/ITL recording,
keep-alive reuse of the raw client, errors counted rather than raised."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bench.http_load import chat_body, chunk_text, parse_sse_line, run_http
from bench.loadgen import OPEN_LOOP_CLIENT, ClosedLoop, OpenLoop
from bench.rawhttp import RawClient, StatusError
from bench.workload import make_requests, split_among_clients

CONTENT = ["Hel", "lo", "!"]


def _events(n_tokens: int) -> list[bytes]:
    chunks: list[dict[str, Any]] = [{"choices": [{"delta": {"role": "assistant"}}]}]
    chunks += [{"choices": [{"delta": {"content": CONTENT[i % 3]}}]} for i in range(n_tokens)]
    chunks.append({"choices": [{"delta": {}, "finish_reason": "length"}]})
    chunks.append({"choices": [], "usage": {"completion_tokens": n_tokens}})
    out = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    return [*out, b"data: [DONE]\n\n"]


class FakeGateway:
    """Answers every POST with a chunked SSE stream of ``max_tokens`` content chunks (or a
    500 when the prompt says so); counts TCP connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> FakeGateway:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = int(head.lower().split("content-length:")[1].split("\r\n")[0])
                body = json.loads(await reader.readexactly(length))
                if "fail" in body["messages"][0]["content"]:
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\n"
                                 b"Content-Length: 4\r\n\r\noops")
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                for event in _events(body["max_tokens"]):
                    writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.002)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def test_sse_lines_and_chunk_text() -> None:
    assert parse_sse_line("data: [DONE]") == ("done", None)
    assert parse_sse_line("event: restart") == ("", None)
    assert parse_sse_line("") == ("", None)
    kind, chunk = parse_sse_line('data: {"choices":[{"delta":{"content":"Hi"}}]}')
    assert kind == "data" and chunk is not None and chunk_text(chunk) == "Hi"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [{"text": "legacy"}]}) == "legacy"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_chat_body_asks_for_exact_streamed_tokens() -> None:
    body = chat_body("m", make_requests("mixed", 2)[1])
    assert body["max_tokens"] == 256 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0


@pytest.mark.parametrize("http_client", ["raw", "httpx"])
async def test_run_http_records_first_chunk_gaps_and_usage(http_client: str) -> None:
    async with FakeGateway() as gw:
        reqs = make_requests("mixed", 4, max_tokens_cap=5)
        load = ClosedLoop(split_among_clients(reqs, 2))
        result = await run_http(gw.url, "m", load, http_client=http_client)
    assert len(result.records) == 4 and not [r for r in result.records if r.error]
    for rec in result.records:
        assert rec.output_tokens == len(rec.token_times) == 5  # role/usage chunks don't count
        assert rec.ttft is not None and 0 < rec.ttft <= rec.e2e  # type: ignore[operator]
        assert len(rec.itls()) == 4 and all(gap >= 0 for gap in rec.itls())
    assert result.wall_s > 0 and result.mean_batch is None
    if http_client == "raw":
        assert gw.connections == 2  # one kept-alive connection per client


@pytest.mark.parametrize("http_client", ["raw", "httpx"])
async def test_without_keepalive_every_request_opens_its_own_connection(
        http_client: str) -> None:
    async with FakeGateway() as gw:
        reqs = make_requests("mixed", 4, max_tokens_cap=3)
        result = await run_http(gw.url, "m", ClosedLoop(split_among_clients(reqs, 2)),
                                http_client=http_client, keepalive=False)
    assert len(result.records) == 4 and not [r for r in result.records if r.error]
    assert gw.connections == 4  # llama-server closes after each answer: never reuse


async def test_errors_are_counted_not_raised() -> None:
    async with FakeGateway() as gw:
        client = RawClient(gw.url)
        with pytest.raises(StatusError) as info:
            body = json.dumps({"messages": [{"content": "fail"}], "max_tokens": 1}).encode()
            async for _ in client.post_lines("/v1/chat/completions", body):
                pass
        assert info.value.status == 500 and info.value.body == b"oops"
        await client.aclose()
        reqs = [r.__class__(r.index, "please fail", r.max_tokens) for r in make_requests(
            "uniform", 2)]
        result = await run_http(gw.url, "m", ClosedLoop([reqs]), http_client="raw")
    assert [r.error for r in result.records] == ["StatusError: HTTP 500: b'oops'"] * 2


async def test_unreachable_gateway_is_an_error_per_request() -> None:
    result = await run_http("http://127.0.0.1:9", "m",
                            ClosedLoop([make_requests("uniform", 2)]), http_client="raw")
    assert len(result.records) == 2 and all(r.error for r in result.records)


def test_raw_client_refuses_https() -> None:
    with pytest.raises(ValueError):
        RawClient("https://example.com")


async def test_open_loop_sends_on_schedule_and_measures_from_the_scheduled_time() -> None:
    async with FakeGateway() as gw:
        reqs = make_requests("uniform", 3, max_tokens_cap=2)
        result = await run_http(gw.url, "m", OpenLoop(reqs, [0.0, 0.05, 0.1]),
                                http_client="raw")
    assert sorted(r.submitted - min(x.submitted for x in result.records)
                  for r in result.records) == pytest.approx([0.0, 0.05, 0.1])
    assert all(r.client == OPEN_LOOP_CLIENT and r.output_tokens == 2 for r in result.records)
    assert result.wall_s >= 0.1
