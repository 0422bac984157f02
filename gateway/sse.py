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
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import describe, error_body
from gateway.openai_format import OpenAIFormat, dumps
from gateway.reader import TIMED_OUT_IN_QUEUE, is_queue_timeout
from gateway.tasks import cancel_and_wait
from shared.errors import TokenfleetError
from shared.protocol import EVENT_ERROR, EVENT_RESTART, EVENT_TOKEN, TokenEvent

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
CANCEL_READ_TIMEOUT_S = 5.0
RESTART_MESSAGE = "the request is being retried from the start; discard the text so far"


def sse_data(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


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

    async def stream_response(self, send: Send) -> None:
        """Starlette's, except that the block ending with ``[DONE]`` also ends the body: one
        write less per stream (the generator is closed right after, in ``__call__``)."""
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for chunk in self._generator:
            is_last = chunk.endswith(DONE)
            await send({"type": "http.response.body", "body": chunk, "more_body": not is_last})
            if is_last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._generator.aclose()
            if self._closer is not None:
                self._closer(False)


class ReadAhead:
    """Reads ``events`` in one task, so that the stream can take every event that has
    arrived since its last write at once: one write per batch instead of one per token
    when the gateway is busy, and no task per event.

    The pending read is never cancelled by a keep-alive tick, so no event is lost; it is
    cancelled only by ``aclose`` (the consumer stops early).
    """

    __slots__ = ("_error", "_events", "_is_done", "_items", "_task", "_waiter")

    def __init__(self, events: AsyncIterator[TokenEvent]) -> None:
        self._events = events
        self._items: deque[TokenEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._is_done = False

    async def _pump(self) -> None:
        try:
            async for event in self._events:
                self._items.append(event)
                self._wake()
        except Exception as exc:  # handed to the consumer after the events before it
            self._error = exc
        finally:
            self._is_done = True
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, timeout_s: float | None) -> list[TokenEvent] | None:
        """Every event read so far (waiting for one first); ``[]`` after ``timeout_s``
        without one; ``None`` once the events have ended. Raises what reading raised."""
        if self._task is None:
            self._task = asyncio.create_task(self._pump())
        if not self._items and not self._is_done:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            timer = None if timeout_s is None else loop.call_later(timeout_s, _expire, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None
        if self._items:
            batch = list(self._items)
            self._items.clear()
            return batch
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return None if self._is_done else []

    async def aclose(self) -> None:
        """Stop the pending read now and close ``events``."""
        if self._task is not None:
            await cancel_and_wait(self._task, CANCEL_READ_TIMEOUT_S)
        await _close(self._events)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _close(events: AsyncIterator[TokenEvent]) -> None:
    """Close an async generator now (its ``finally`` runs here, not at garbage collection)."""
    closing = getattr(events, "aclose", None)
    if closing is not None:
        with contextlib.suppress(Exception):
            await closing()


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
    parts = [] if fmt.n > 1 else [  # n > 1: each choice's final chunk came with its end
        sse_data(chunk) for chunk in fmt.closing_chunks(event.finish_reason or "stop")]
    if fmt.include_usage:
        used_prompt = event.prompt_tokens or prompt_tokens
        parts.append(sse_data(fmt.usage_chunk(used_prompt, event.completion_tokens)))
    return [*parts, DONE]


def _choice_chunks(event: TokenEvent, fmt: OpenAIFormat) -> list[bytes]:
    """n > 1: one choice's token event, and its final chunk when it ended that choice."""
    parts = []
    if event.text or event.logprobs:
        parts.append(sse_data(fmt.delta_chunk(event.text, event.logprobs, event.index)))
    if event.finish_reason:
        parts.append(sse_data(fmt.final_chunk(event.finish_reason, event.index)))
    return parts


def encode_event(event: TokenEvent, fmt: OpenAIFormat, *, request_id: str,
                 prompt_tokens: int, with_id: bool = False) -> bytes:
    """The SSE bytes of one event (``b""`` for events a client does not see)."""
    event_id = event.seq if with_id else None
    if event.type == EVENT_TOKEN:
        if not event.text and not event.logprobs and not event.finish_reason:
            return b""
        if fmt.n > 1:
            return _block(event_id, *_choice_chunks(event, fmt))
        if fmt.tool_mode and fmt.kind == "chat":
            chunks = fmt.content_chunks(event.text, event.logprobs)
            return _block(event_id, *(sse_data(c) for c in chunks)) if chunks else b""
        if event.logprobs or fmt.wants_logprobs:
            return _block(event_id, sse_data(fmt.delta_chunk(event.text, event.logprobs)))
        return _block(event_id, b"data: " + fmt.delta_json(event.text) + b"\n\n")
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
    reader = ReadAhead(events)
    role = fmt.role_chunk()
    head = sse_data(role) if role is not None and not is_resumed else b""  # sent with the
    try:  # first block: one write less per stream (TTFT counts the first token, not this)
        while (batch := await reader.take(keepalive_s)) is not None:
            if not batch:
                yield head + KEEPALIVE
                head = b""
                continue
            blocks = [head]
            for event in batch:
                blocks.append(encode_event(event, fmt, request_id=request_id,
                                           prompt_tokens=prompt_tokens, with_id=with_ids))
                if event.is_terminal:
                    finished = True
                    break
            block = b"".join(blocks)
            head = b""
            if block:
                yield block
            if finished:
                return
        finished = True
        yield head + sse_error("the event stream ended without a result") + DONE
    except TokenfleetError as exc:
        _, body = describe(exc)
        finished = True
        yield head + sse_data(body) + DONE
    except RedisError as exc:
        finished = True
        yield head + sse_error(f"Redis unavailable: {exc}", code="redis_unavailable") + DONE
    finally:
        on_close(finished)
        await reader.aclose()  # stops a pending read now, not at garbage collection
