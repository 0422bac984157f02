"""Run a submitted request to the client: stream its events, or wait for the whole answer.

Neither path has a timer of its own: a request's ``timeout`` bounds its wait in the queue
(the worker, or the reader past the deadline, fails it as ``queue_timeout``); once running,
it runs to its end. A client that goes away (a closed stream, or a disconnect while a
non-streaming request waits) cancels the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.types import Receive

from gateway.errors import GenerationFailedError, QueueTimeoutError
from gateway.openai_format import Choice, OpenAIFormat, Outcome
from gateway.reader import TIMED_OUT_IN_QUEUE, is_queue_timeout, job_events
from gateway.sse import EventStreamResponse, StreamCloser, openai_stream
from gateway.state import GatewayState
from gateway.submit import Submission, enqueue
from gateway.tasks import cancel_and_wait
from shared.protocol import EVENT_DONE, EVENT_ERROR, EVENT_RESTART, EVENT_TOKEN, TokenEvent

CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads it
STOP_WAIT_TIMEOUT_S = 5.0


async def collect(events: AsyncIterator[TokenEvent], prompt_tokens: int) -> Outcome:
    """The whole answer from a request's events (every choice's when n > 1)."""
    parts: dict[int, list[str]] = {0: []}
    logprobs: dict[int, list[list[Any]]] = {0: []}
    reasons: dict[int, str] = {}
    async for event in events:
        if event.type == EVENT_TOKEN:
            parts.setdefault(event.index, []).append(event.text)
            logprobs.setdefault(event.index, []).extend(event.logprobs)
            if event.finish_reason:  # n > 1: this choice ended
                reasons[event.index] = event.finish_reason
        elif event.type == EVENT_RESTART:
            parts, logprobs, reasons = {0: []}, {0: []}, {}
        elif event.type == EVENT_DONE:
            reason = event.finish_reason or "stop"
            choices = [Choice("".join(parts[i]), reasons.get(i, reason), logprobs[i] or None)
                       for i in sorted(parts)]
            return Outcome(text=choices[0].text, finish_reason=choices[0].finish_reason,
                           prompt_tokens=event.prompt_tokens or prompt_tokens,
                           completion_tokens=event.completion_tokens,
                           logprobs=choices[0].logprobs,
                           choices=choices if len(choices) > 1 else None)
        elif event.type == EVENT_ERROR:
            raise _failure(event)
    raise GenerationFailedError("the event stream ended without a result")


def _failure(event: TokenEvent) -> Exception:
    if is_queue_timeout(event):
        return QueueTimeoutError(
            f"request {event.id} {event.error or TIMED_OUT_IN_QUEUE}: it waited longer than "
            "its timeout for a worker; retry later or with a longer timeout")
    return GenerationFailedError(f"generation failed: {event.error or 'unknown error'}")


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (the request body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def respond(gw: GatewayState, submission: Submission, receive: Receive) -> Response:
    """Enqueue a live request and answer it (SSE when ``stream``, else one JSON body).

    ``receive``: the request's ASGI channel, watched for a disconnect while a
    non-streaming request waits."""
    request = submission.request
    fmt = OpenAIFormat(kind=submission.kind, id=request.id, model=request.model,
                       created=int(request.created_at),
                       include_usage=submission.include_usage,
                       wants_logprobs=request.params.logprobs is not None,
                       tool_mode=submission.tool_mode, echo=submission.echo,
                       n=request.params.n)
    mailbox = gw.dispatcher.register(request.id)  # before XADD: no event can be missed
    try:
        await enqueue(gw, submission)
    except BaseException:
        gw.dispatcher.unregister(request.id)
        raise
    events = job_events(gw.redis, gw.keys, request.id, mailbox, deadline=request.deadline)

    if submission.stream:
        def on_close(finished: bool) -> None:
            gw.dispatcher.unregister(request.id)
            if not finished:  # the client went away: stop spending tokens on it
                _cancel(gw, submission)

        closer = StreamCloser(on_close)
        body = openai_stream(events, fmt, request_id=request.id,
                             prompt_tokens=submission.num_prompt_tokens, on_close=closer,
                             keepalive_s=gw.settings.sse_keepalive_s)
        return EventStreamResponse(body, closer)

    try:
        outcome = await _collect_unless_gone(events, submission, receive)
    finally:
        gw.dispatcher.unregister(request.id)
        with contextlib.suppress(Exception):
            await events.aclose()
    if outcome is None:
        _cancel(gw, submission)
        return Response(status_code=CLIENT_CLOSED_STATUS)
    return JSONResponse(fmt.response(outcome))


async def _collect_unless_gone(events: AsyncIterator[TokenEvent], submission: Submission,
                               receive: Receive) -> Outcome | None:
    """The whole answer, or ``None`` when the client disconnected first."""
    collecting = asyncio.create_task(collect(events, submission.num_prompt_tokens))
    watching = asyncio.create_task(wait_for_disconnect(receive))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
        if collecting.done():
            return collecting.result()
        return None
    finally:
        for task in (watching, collecting):
            await cancel_and_wait(task, STOP_WAIT_TIMEOUT_S)
        if watching.done() and not watching.cancelled():
            watching.exception()  # retrieved: a channel error only means the client left


def _cancel(gw: GatewayState, submission: Submission) -> None:
    request = submission.request
    gw.spawn(gw.jobs.request_cancel(request.id, request.owner), name=f"cancel-{request.id}")
