"""Server-sent events: encoding, and the OpenAI-style stream of one request's events.

A stream is ``data: {chunk}`` lines ending with ``data: [DONE]``. Two additions to OpenAI:
``data: {"error": {...}}`` before ``[DONE]`` when generation fails, and an
``event: restart`` event when a retry regenerates the answer from scratch (the client drops
the text it has shown so far). See docs/api.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import describe, error_body
from gateway.openai_format import OpenAIFormat
from shared.errors import TokenfleetError
from shared.protocol import EVENT_DONE, EVENT_ERROR, EVENT_RESTART, EVENT_TOKEN, TokenEvent

DONE = b"data: [DONE]\n\n"
RESTART_MESSAGE = "the request is being retried from the start; discard the text so far"


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() \
        + b"\n\n"


def sse_restart(request_id: str) -> bytes:
    body = {"restart": True, "id": request_id, "message": RESTART_MESSAGE}
    return b"event: restart\n" + sse_data(body)


def sse_error(message: str, code: str = "generation_failed") -> bytes:
    return sse_data(error_body(message, kind="server_error", code=code))


class StreamCloser:
    """A stream's cleanup, run exactly once: ``closer(finished)``."""

    __slots__ = ("_callback", "_is_closed")

    def __init__(self, callback: Callable[[bool], None]) -> None:
        self._callback = callback
        self._is_closed = False

    def __call__(self, finished: bool) -> None:
        if not self._is_closed:
            self._is_closed = True
            self._callback(finished)


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` whose generator and cleanup always run to the end.

    The generator is closed as soon as the response ends (its ``finally`` runs now, not at
    garbage collection), and ``closer(False)`` runs even if the generator never started.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[bytes, None],
                 closer: StreamCloser | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        self._generator = content
        self._closer = closer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._generator.aclose()
            if self._closer is not None:
                self._closer(False)


async def openai_stream(events: AsyncIterator[TokenEvent], fmt: OpenAIFormat, *,
                        request_id: str, prompt_tokens: int,
                        on_close: Callable[[bool], None]) -> AsyncGenerator[bytes, None]:
    """The SSE body of a streaming request; ``on_close(finished)`` runs however it ends.

    ``on_close`` must not block (it may run while the stream is being cancelled); pass a
    ``StreamCloser`` to the response too, so it also runs if the body never starts.
    """
    finished = False
    try:
        role = fmt.role_chunk()
        if role is not None:
            yield sse_data(role)
        async for event in events:
            if event.type == EVENT_TOKEN:
                if event.text:
                    yield sse_data(fmt.delta_chunk(event.text))
            elif event.type == EVENT_RESTART:
                yield sse_restart(request_id)
            elif event.type == EVENT_DONE:
                finished = True
                yield sse_data(fmt.final_chunk(event.finish_reason or "stop"))
                if fmt.include_usage:
                    used_prompt = event.prompt_tokens or prompt_tokens
                    yield sse_data(fmt.usage_chunk(used_prompt, event.completion_tokens))
                yield DONE
                return
            elif event.type == EVENT_ERROR:
                finished = True
                yield sse_error(event.error or "generation failed")
                yield DONE
                return
        yield sse_error("the event stream ended without a result")
        yield DONE
        finished = True
    except TokenfleetError as exc:
        _, body = describe(exc)
        yield sse_data(body)
        yield DONE
        finished = True
    except RedisError as exc:
        yield sse_error(f"Redis unavailable: {exc}", code="redis_unavailable")
        yield DONE
        finished = True
    finally:
        on_close(finished)
