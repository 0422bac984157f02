"""Run a submitted request to the client: stream its events, or wait for the whole answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response

from gateway.errors import GatewayTimeoutError, GenerationFailedError
from gateway.openai_format import OpenAIFormat, Outcome
from gateway.reader import job_events
from gateway.sse import EventStreamResponse, StreamCloser, openai_stream
from gateway.state import GatewayState
from gateway.submit import Submission, enqueue
from shared.protocol import EVENT_DONE, EVENT_ERROR, EVENT_RESTART, EVENT_TOKEN, TokenEvent

NON_STREAM_TIMEOUT_S = 600.0  # when TOKENFLEET_REQUEST_TIMEOUT_S is unset
DEADLINE_GRACE_S = 5.0  # past the request's deadline, the worker reports it; wait a bit more


def wait_timeout_s(gw: GatewayState) -> float:
    timeout_s = gw.settings.request_timeout_s
    return timeout_s + DEADLINE_GRACE_S if timeout_s else NON_STREAM_TIMEOUT_S


async def collect(events: AsyncIterator[TokenEvent], prompt_tokens: int) -> Outcome:
    """The whole answer from a request's events."""
    parts: list[str] = []
    async for event in events:
        if event.type == EVENT_TOKEN:
            parts.append(event.text)
        elif event.type == EVENT_RESTART:
            parts.clear()
        elif event.type == EVENT_DONE:
            return Outcome(text="".join(parts), finish_reason=event.finish_reason or "stop",
                           prompt_tokens=event.prompt_tokens or prompt_tokens,
                           completion_tokens=event.completion_tokens)
        elif event.type == EVENT_ERROR:
            raise GenerationFailedError(f"generation failed: {event.error or 'unknown error'}")
    raise GenerationFailedError("the event stream ended without a result")


async def respond(gw: GatewayState, submission: Submission) -> Response:
    """Enqueue a live request and answer it (SSE when ``stream``, else one JSON body)."""
    request = submission.request
    fmt = OpenAIFormat(kind=submission.kind, id=request.id, model=request.model,
                       created=int(request.created_at),
                       include_usage=submission.include_usage)
    mailbox = gw.dispatcher.register(request.id)  # before XADD: no event can be missed
    try:
        await enqueue(gw, submission)
    except BaseException:
        gw.dispatcher.unregister(request.id)
        raise
    events = job_events(gw.redis, gw.keys, request.id, mailbox)

    if submission.stream:
        def on_close(finished: bool) -> None:
            gw.dispatcher.unregister(request.id)
            if not finished:  # the client went away: stop spending tokens on it
                gw.spawn(gw.jobs.request_cancel(request.id, request.owner),
                         name=f"cancel-{request.id}")

        closer = StreamCloser(on_close)
        body = openai_stream(events, fmt, request_id=request.id,
                             prompt_tokens=submission.num_prompt_tokens, on_close=closer)
        return EventStreamResponse(body, closer)

    try:
        outcome = await asyncio.wait_for(collect(events, submission.num_prompt_tokens),
                                         timeout=wait_timeout_s(gw))
    except asyncio.TimeoutError:
        gw.spawn(gw.jobs.request_cancel(request.id, request.owner), name=f"cancel-{request.id}")
        raise GatewayTimeoutError(
            f"request {request.id} did not finish within {wait_timeout_s(gw):.0f} s; "
            "it was cancelled (use stream=true or POST /v1/jobs for long generations)"
        ) from None
    finally:
        gw.dispatcher.unregister(request.id)
        with contextlib.suppress(Exception):
            await events.aclose()
    return JSONResponse(fmt.response(outcome))
