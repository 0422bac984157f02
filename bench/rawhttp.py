"""A lean HTTP/1.1 client for streamed responses, so the load generator stays cheap.

On this 2-core machine the load generator shares the CPU with the gateway it measures: httpx
spends about 2 ms of CPU per streamed chat request, more than the gateway itself. This
client does only what the bench needs: POST a JSON body on a kept-alive connection and
yield the lines of a chunked (or ``Content-Length``) response. No TLS, no redirects, no
proxies; ``http://host:port`` only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class StatusError(Exception):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class RawClient:
    def __init__(self, base_url: str, *, keepalive: bool = True) -> None:
        """``keepalive=False``: a connection per request (servers that close a connection
        after a streamed answer without saying ``Connection: close``)."""
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"RawClient speaks plain http://host:port only, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.keepalive = keepalive
        self._idle: list[Connection] = []

    async def aclose(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()

    async def post_lines(self, path: str, body: bytes) -> AsyncIterator[str]:
        """POST ``body`` (JSON) and yield the response's lines as they arrive (without the
        line ends). Raises ``StatusError`` for a non-200 answer. The connection goes back to
        the pool only when the response was read to its end."""
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(
            self.host, self.port)
        reusable = False
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                         f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status, headers = await _read_head(reader)
            if status != 200:
                raise StatusError(status, b"".join([p async for p in _body(reader, headers)]))
            pending = b""
            async for piece in _body(reader, headers):
                pending += piece
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.rstrip(b"\r").decode()
            if pending:
                yield pending.decode()
            reusable = self.keepalive and headers.get("connection", "").lower() != "close" and (
                "content-length" in headers or "chunked" in headers.get("transfer-encoding", ""))
        finally:
            if reusable:
                self._idle.append((reader, writer))
            else:
                writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = raw.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece
