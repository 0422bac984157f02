"""Answering a request whose ``Idempotency-Key`` is already bound to a job: the first
request's answer, rebuilt from the job, with ``Idempotent-Replayed: true``.

- ``POST /v1/jobs``: 202, ``Location`` and the job as it is now (``gateway.routers.jobs``).
- chat and completions: the same response as the first request got, from the job's events
  (followed while the job still runs): one JSON body, or the SSE stream when ``stream``
  was set. A replay that goes away does not cancel the job; only the first request does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.auth import Principal
from gateway.errors import describe
from gateway.generation import collect
from gateway.idempotency import REPLAYED_HEADER, Claim, IdempotentReplay, claim_key
from gateway.openai_format import OpenAIFormat
from gateway.reader import job_events
from gateway.sse import EventStreamResponse, openai_stream
from gateway.state import GatewayState
from shared.errors import ConflictError, JobNotFoundError, TokenfleetError
from shared.job_record import JobField, int_field

Submit = Callable[[Claim | None], Awaitable[Response]]
Replay = Callable[[str], Awaitable[Response]]


async def submit_once(gw: GatewayState, principal: Principal, request: Request,
                      header: str | None, *, submit: Submit, replay: Replay) -> Response:
    """``submit(claim)``, unless the ``Idempotency-Key`` is bound to a job: then
    ``replay(job_id)``, marked as a replay."""
    claim = await claim_key(gw.redis, gw.keys, principal.owner, request, header,
                            gw.settings.idempotency_ttl_s)
    if claim is None or claim.bound_job is None:
        try:
            return await submit(claim)
        except IdempotentReplay as raced:  # a concurrent retry queued the job first
            job_id = raced.job_id
    else:
        job_id = claim.bound_job
    response = await replay(job_id)
    response.headers[REPLAYED_HEADER] = "true"
    return response


async def bound_fields(gw: GatewayState, principal: Principal,
                        job_id: str) -> dict[bytes, bytes]:
    try:
        return await gw.jobs.fields(job_id, principal)
    except JobNotFoundError:
        raise ConflictError(
            f"the job this Idempotency-Key created ({job_id}) no longer exists (purged or "
            "expired); send the request with a new Idempotency-Key",
            param="Idempotency-Key", code="idempotency_key_expired") from None


async def replay_generation(gw: GatewayState, principal: Principal, job_id: str, *,
                            stream: bool, include_usage: bool) -> Response:
    """The chat or completion response of the bound job (streamed when ``stream``)."""
    fields = await bound_fields(gw, principal, job_id)
    fmt = OpenAIFormat.for_job(job_id, fields, include_usage=include_usage)
    prompt_tokens = int_field(fields, JobField.PROMPT_TOKENS) or 0
    events = job_events(gw.redis, gw.keys, job_id)
    if stream:
        return EventStreamResponse(openai_stream(
            events, fmt, request_id=job_id, prompt_tokens=prompt_tokens,
            on_close=lambda finished: None, keepalive_s=gw.settings.sse_keepalive_s))
    try:
        outcome = await collect(events, prompt_tokens)
    except TokenfleetError as exc:
        status, body = describe(exc)
        return JSONResponse(body, status_code=status)
    finally:
        await events.aclose()
    return JSONResponse(fmt.response(outcome))

