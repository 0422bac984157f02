"""The OpenAI Batch input format: one JSON object per line.

``{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``.
``parse_line`` checks a line's envelope (not its body: that is the gateway's validation,
run by the orchestrator); ``iter_lines`` splits a byte stream into lines with their offsets
without ever holding more than one line and one chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

ENDPOINTS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions")
MAX_CUSTOM_ID_CHARS = 512


@dataclass(slots=True)
class InputLine:
    number: int  # 1-based line number in the file
    offset: int  # byte offset of the line's first byte
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(slots=True)
class LineError(Exception):
    """One bad line, in the shape of an entry of OpenAI's ``batch.errors.data``."""

    line: int
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": f"line {self.line}: {self.message}",
                "param": self.param, "line": self.line}


def parse_line(raw: bytes, number: int, offset: int, endpoint: str | None) -> InputLine:
    """The envelope of one line; ``LineError`` says what to change.

    ``endpoint``: the batch's endpoint, which every line's ``url`` must equal (``None``:
    any of ``ENDPOINTS``).
    """
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LineError(number, "invalid_json_line",
                        f"not valid JSON ({exc}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise LineError(number, "invalid_json_line",
                        f"expected a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError(number, "missing_required_parameter",
                        "custom_id is required and must be a non-empty string", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise LineError(number, "invalid_value",
                        f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters", "custom_id")
    method = obj.get("method")
    if method != "POST":
        raise LineError(number, "invalid_value",
                        f"method must be \"POST\", got {method!r}", "method")
    url = obj.get("url")
    if url not in ENDPOINTS:
        raise LineError(number, "invalid_url",
                        f"url {url!r} is not supported; use one of: {', '.join(ENDPOINTS)}",
                        "url")
    if endpoint is not None and url != endpoint:
        raise LineError(number, "mismatched_endpoint",
                        f"url {url!r} differs from the batch's endpoint {endpoint!r}; a batch "
                        "holds requests for one endpoint", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError(number, "missing_required_parameter",
                        "body is required and must be a JSON object", "body")
    return InputLine(number=number, offset=offset, custom_id=custom_id, url=url, body=body)


class LineSplitter:
    """Feed chunks, get ``(offset, line)``; a line over ``max_line_bytes`` comes back cut
    to that length (its parse then fails), so memory stays bounded by the limit."""

    def __init__(self, start_offset: int = 0, max_line_bytes: int = 1 << 20) -> None:
        self.offset = start_offset  # offset of the first byte of ``_buffer``
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._dropped = 0  # bytes of the current line past max_line_bytes, not kept

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes]]:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._keep(chunk[start:])
                return
            self._keep(chunk[start:end])
            line, line_offset = bytes(self._buffer), self.offset
            self.offset += len(self._buffer) + self._dropped + 1
            self._buffer.clear()
            self._dropped = 0
            start = end + 1
            yield line_offset, line

    def finish(self) -> Iterator[tuple[int, bytes]]:
        if self._buffer:
            line, line_offset = bytes(self._buffer), self.offset
            self.offset += len(self._buffer) + self._dropped
            self._buffer.clear()
            yield line_offset, line

    def _keep(self, part: bytes) -> None:
        room = self.max_line_bytes - len(self._buffer)
        if len(part) > room:
            self._dropped += len(part) - max(room, 0)
            part = part[:max(room, 0)]
        self._buffer += part


async def iter_lines(chunks: AsyncIterator[bytes], start_offset: int = 0,
                     max_line_bytes: int = 1 << 20) -> AsyncIterator[tuple[int, bytes]]:
    """``(offset, line)`` for each line of the stream, newline excluded."""
    splitter = LineSplitter(start_offset, max_line_bytes)
    async for chunk in chunks:
        for item in splitter.feed(chunk):
            yield item
    for item in splitter.finish():
        yield item


def is_blank(line: bytes) -> bool:
    return not line.strip()
