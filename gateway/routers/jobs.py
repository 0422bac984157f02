"""Background jobs: ``POST /v1/jobs`` (idempotent, with webhooks), ``GET /v1/jobs`` (the
caller's list), ``GET /v1/jobs/{id}`` (with queue position and ``Retry-After``), its stream
(with ``event: queued`` updates), cancel and purge."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from gateway.auth import Principal
from gateway.deps import GatewayDep, PrincipalDep
from gateway.idempotency import Claim
from gateway.job_list import DEFAULT_LIMIT, MAX_LIMIT, list_jobs
from gateway.jobs import job_view
from gateway.openai_format import OpenAIFormat
from gateway.queue_position import estimate_for, job_estimator, retry_after_s, with_queue_updates
from gateway.reader import QUEUE_TIMEOUT_REASON, has_ended_by, job_events
from gateway.replay import bound_fields, submit_once
from gateway.schemas import JobRequest
from gateway.sse import DONE, EventStreamResponse, openai_stream
from gateway.state import GatewayState
from gateway.submit import ID_PREFIXES, enqueue, prepare
from shared.errors import InvalidRequestError, JobNotFoundError
from shared.job_record import str_field
from shared.job_view import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS
from shared.webhook_url import check_webhook_url

router = APIRouter(tags=["jobs"])

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")


def _one_chunk(data: bytes) -> AsyncGenerator[bytes, None]:
    async def body() -> AsyncGenerator[bytes, None]:
        yield data
    return body()


def error_code(view: dict[str, Any]) -> str | None:
    """What a client can act on when a job failed: ``queue_timeout`` (it waited past its
    ``timeout``; retry) or ``generation_failed``."""
    if view.get("status") != "failed":
        return None
    return "queue_timeout" if view.get("finish_reason") == QUEUE_TIMEOUT_REASON \
        else "generation_failed"


def _with_error_code(view: dict[str, Any]) -> dict[str, Any]:
    view["error_code"] = error_code(view)
    return view


def _resume_after(last_event_id: str | None) -> int | None:
    """The ``seq`` a reconnecting client has seen (``Last-Event-ID``), or None."""
    if last_event_id is None or not last_event_id.strip():
        return None
    value = last_event_id.strip()
    if not value.isdigit() or len(value) > 18:
        raise InvalidRequestError("Last-Event-ID must be an event id this stream sent "
                                  "(a non-negative integer)", param="Last-Event-ID")
    return int(value)


def _checked_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):  # also keeps ids from reaching into other keys
        raise JobNotFoundError(f"job {job_id!r} not found")
    return job_id


async def _webhook_fields(gw: GatewayState, body: JobRequest) -> tuple[str | None, str | None]:
    """The job's ``webhook`` and comma-separated event filter, checked (400 if refused)."""
    if body.webhook is None:
        if body.webhook_events_filter is not None:
            raise InvalidRequestError("webhook_events_filter needs a webhook URL",
                                      param="webhook_events_filter")
        return None, None
    if gw.settings.webhook_secret is None:
        raise InvalidRequestError(
            "this server sends no webhooks (its operator has not set "
            "TOKENFLEET_WEBHOOK_SECRET); poll GET /v1/jobs/{id} or read /v1/jobs/{id}/stream",
            param="webhook", code="webhooks_disabled")
    await check_webhook_url(body.webhook, allow_private=gw.settings.webhook_allow_private)
    wanted = body.webhook_events_filter
    if wanted is None:
        wanted = list(DEFAULT_WEBHOOK_EVENTS)
    unknown = sorted(set(wanted) - set(WEBHOOK_EVENTS))
    if unknown or not wanted:
        raise InvalidRequestError(
            f"webhook_events_filter must be a non-empty list of {list(WEBHOOK_EVENTS)}"
            + (f"; unknown: {unknown}" if unknown else ""), param="webhook_events_filter")
    return body.webhook, ",".join(event for event in WEBHOOK_EVENTS if event in wanted)


@router.post("/v1/jobs", status_code=202, summary="Queue a generation and return at once")
async def create_job(body: JobRequest, gw: GatewayDep, principal: PrincipalDep,
                     request: Request,
                     idempotency_key: Annotated[str | None, Header()] = None) -> Response:
    async def submit(claim: Claim | None) -> Response:
        if (body.messages is None) == (body.prompt is None):
            raise InvalidRequestError(
                "a job needs either messages (chat) or prompt (completion)", param="messages")
        webhook, webhook_events = await _webhook_fields(gw, body)
        submission = await prepare(gw, body, principal, messages=body.messages,
                                   prompt=body.prompt, id_prefix=ID_PREFIXES["job"], live=False)
        submission.idempotency = claim
        submission.is_listed = True
        submission.webhook, submission.webhook_events = webhook, webhook_events
        await enqueue(gw, submission)
        return await _accepted(gw, principal, submission.id)

    async def replay(job_id: str) -> Response:
        await bound_fields(gw, principal, job_id)  # 409 when the job is gone
        return await _accepted(gw, principal, job_id)

    return await submit_once(gw, principal, request, idempotency_key, submit=submit,
                             replay=replay)


async def _current(gw: GatewayState, principal: Principal,
                   job_id: str) -> tuple[dict[str, Any], int | None]:
    """The job as ``GET`` shows it (with its queue position when queued) and how many
    seconds a client should wait before polling it again (None: no need)."""
    fields, text = await gw.jobs.read(job_id, principal)
    view = job_view(job_id, fields, text)
    found = await estimate_for(gw.redis, gw.keys, fields)
    if found is not None:
        view.update(found.as_dict())
    return view, retry_after_s(view["status"], found)


def _retry_headers(retry_after: int | None) -> dict[str, str]:
    return {} if retry_after is None else {"Retry-After": str(retry_after)}


async def _accepted(gw: GatewayState, principal: Principal, job_id: str) -> JSONResponse:
    """202 + ``Location``: the answer to ``POST /v1/jobs``, first or replayed."""
    view, retry_after = await _current(gw, principal, job_id)
    headers = {"Location": f"/v1/jobs/{job_id}", **_retry_headers(retry_after)}
    return JSONResponse(view, status_code=202, headers=headers)


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@router.get("/v1/jobs", summary="The caller's jobs, newest first (OpenAI list shape)")
async def get_jobs(gw: GatewayDep, principal: PrincipalDep,
                   after: Annotated[str | None, Query()] = None,
                   limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
                   status: Annotated[JobStatus | None, Query()] = None) -> dict[str, Any]:
    return await list_jobs(gw.redis, gw.keys, principal.owner, after=after, limit=limit,
                           status=status)


@router.get("/v1/jobs/{job_id}", summary="A job's status, text so far, counts and timings")
async def get_job(job_id: str, gw: GatewayDep, principal: PrincipalDep,
                  response: Response) -> dict[str, Any]:
    view, retry_after = await _current(gw, principal, _checked_id(job_id))
    response.headers.update(_retry_headers(retry_after))
    return view


@router.get("/v1/jobs/{job_id}/stream",
            summary="The job's tokens as SSE, from the start or after Last-Event-ID")
async def stream_job(job_id: str, gw: GatewayDep, principal: PrincipalDep,
                     last_event_id: Annotated[str | None, Header()] = None,
                     ) -> EventStreamResponse:
    fields = await gw.jobs.fields(_checked_id(job_id), principal)
    after_seq = _resume_after(last_event_id)
    if after_seq is not None and await has_ended_by(gw.redis, gw.keys, job_id, after_seq):
        return EventStreamResponse(_one_chunk(f"id: {after_seq}\n".encode() + DONE))
    fmt = OpenAIFormat.for_job(job_id, fields, include_usage=True)
    events = job_events(gw.redis, gw.keys, job_id,
                        after_seq=-1 if after_seq is None else after_seq)
    prompt_tokens = int(str_field(fields, "prompt_tokens") or 0)
    # A reader leaving does not cancel the job: only DELETE (or its own stream) does.
    body = openai_stream(
        events, fmt, request_id=job_id, prompt_tokens=prompt_tokens,
        on_close=lambda finished: None, keepalive_s=gw.settings.sse_keepalive_s,
        with_ids=True, is_resumed=after_seq is not None)
    return EventStreamResponse(with_queue_updates(body, job_estimator(gw.redis, gw.keys,
                                                                       job_id)))


@router.delete("/v1/jobs/{job_id}",
               summary="Cancel a job; with ?purge=true, remove a finished job now")
async def cancel_job(job_id: str, gw: GatewayDep, principal: PrincipalDep,
                     purge: Annotated[bool, Query()] = False) -> dict[str, Any]:
    if purge:
        return await gw.jobs.purge(_checked_id(job_id), principal)
    return _with_error_code(await gw.jobs.cancel(_checked_id(job_id), principal))
