"""Server-sent events: encoding, and the OpenAI-style stream of one request's events.

A stream is ``data: {chunk}`` lines ending with ``data: [DONE]``. Additions to OpenAI:
``data: {"error": {...}}`` before ``[DONE]`` when generation fails (``code:
"queue_timeout"`` when the request waited in the queue past its ``timeout``), an
``event: restart`` event when a retry regenerates the answer from scratch (the client drops
the text it has shown so far), a ``: keep-alive`` comment while no event arrives, and, on
job streams, ``id: <seq>`` on every event so a client can resume with ``Last-Event-ID``.
See docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import describe, error_body
from gateway.openai_format import OpenAIFormat
from gateway.reader import TIMED_OUT_IN_QUEUE, is_queue_timeout
from gateway.tasks import cancel_and_wait
from shared.errors import TokenfleetError
from shared.protocol import EVENT_ERROR, EVENT_RESTART, EVENT_TOKEN, TokenEvent

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
CANCEL_READ_TIMEOUT_S = 5.0
RESTART_MESSAGE = "the request is being retried from the start; discard the text so far"


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() \
        + b"\n\n"


def sse_restart(request_id: str) -> bytes:
    body = {"restart": True, "id": request_id, "message": RESTART_MESSAGE}
    return b"event: restart\n" + sse_data(body)


def sse_error(message: str, code: str = "generation_failed", kind: str = "server_error") -> bytes:
    return sse_data(error_body(message, kind=kind, code=code))


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


async def with_keepalive(events: AsyncIterator[TokenEvent],
                         interval_s: float | None) -> AsyncGenerator[TokenEvent | None, None]:
    """``events``, with a ``None`` after every ``interval_s`` in which none arrived.

    The pending read is kept across ticks (never cancelled by one), so no event is lost;
    it is cancelled only when the consumer stops early.
    """
    if interval_s is None:
        try:
            async for event in events:
                yield event
        finally:
            await _close(events)
        return
    pending: asyncio.Task[TokenEvent] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.create_task(_next(events))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                event = task.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            await cancel_and_wait(pending, CANCEL_READ_TIMEOUT_S)
            if not pending.cancelled():
                with contextlib.suppress(BaseException):
                    pending.result()
        await _close(events)


async def _close(events: AsyncIterator[TokenEvent]) -> None:
    """Close an async generator now (its ``finally`` runs here, not at garbage collection)."""
    closing = getattr(events, "aclose", None)
    if closing is not None:
        with contextlib.suppress(Exception):
            await closing()


async def _next(events: AsyncIterator[TokenEvent]) -> TokenEvent:
    return await anext(events)


def _block(event_id: int | None, *events: bytes) -> bytes:
    """SSE events that belong together (written at once), each with ``id:`` when given."""
    if event_id is None:
        return b"".join(events)
    prefix = f"id: {event_id}\n".encode()
    return b"".join(prefix + event for event in events)


def _ending(event: TokenEvent, fmt: OpenAIFormat, prompt_tokens: int) -> list[bytes]:
    """The SSE events of a terminal event, ``[DONE]`` last."""
    if event.type == EVENT_ERROR:
        if is_queue_timeout(event):
            return [sse_error(event.error or TIMED_OUT_IN_QUEUE, code="queue_timeout",
                              kind="timeout_error"), DONE]
        return [sse_error(event.error or "generation failed"), DONE]
    parts = [sse_data(fmt.final_chunk(event.finish_reason or "stop"))]
    if fmt.include_usage:
        used_prompt = event.prompt_tokens or prompt_tokens
        parts.append(sse_data(fmt.usage_chunk(used_prompt, event.completion_tokens)))
    return [*parts, DONE]


def encode_event(event: TokenEvent, fmt: OpenAIFormat, *, request_id: str,
                 prompt_tokens: int, with_id: bool = False) -> bytes:
    """The SSE bytes of one event (``b""`` for events a client does not see)."""
    event_id = event.seq if with_id else None
    if event.type == EVENT_TOKEN:
        if not event.text and not event.logprobs:
            return b""
        return _block(event_id, sse_data(fmt.delta_chunk(event.text, event.logprobs)))
    if event.type == EVENT_RESTART:
        return _block(event_id, sse_restart(request_id))
    if event.is_terminal:
        return _block(event_id, *_ending(event, fmt, prompt_tokens))
    return b""


async def openai_stream(events: AsyncIterator[TokenEvent], fmt: OpenAIFormat, *,
                        request_id: str, prompt_tokens: int,
                        on_close: Callable[[bool], None], keepalive_s: float | None = None,
                        with_ids: bool = False,
                        is_resumed: bool = False) -> AsyncGenerator[bytes, None]:
    """The SSE body of a streaming request; ``on_close(finished)`` runs however it ends.

    ``keepalive_s``: a ``: keep-alive`` comment after that long without an event.
    ``with_ids``: every event carries ``id: <seq>`` (resumable job streams); a resumed
    stream (``is_resumed``) does not repeat the chat role chunk.
    ``on_close`` must not block (it may run while the stream is being cancelled); pass a
    ``StreamCloser`` to the response too, so it also runs if the body never starts.
    """
    finished = False
    ticks = with_keepalive(events, keepalive_s)
    try:
        role = fmt.role_chunk()
        if role is not None and not is_resumed:
            yield sse_data(role)
        async for event in ticks:
            if event is None:
                yield KEEPALIVE
                continue
            block = encode_event(event, fmt, request_id=request_id,
                                 prompt_tokens=prompt_tokens, with_id=with_ids)
            if block:
                yield block
            if event.is_terminal:
                finished = True
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
        await ticks.aclose()  # stops a pending read now, not at garbage collection
