"""Background jobs: ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, its stream, and cancel."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from gateway.deps import GatewayDep, PrincipalDep
from gateway.jobs import job_view
from gateway.openai_format import Kind, OpenAIFormat
from gateway.reader import QUEUE_TIMEOUT_REASON, has_ended_by, job_events
from gateway.schemas import JobRequest
from gateway.sse import DONE, EventStreamResponse, openai_stream
from gateway.submit import ID_PREFIXES, enqueue, prepare
from shared.errors import InvalidRequestError, JobNotFoundError
from shared.job_record import str_field

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


@router.post("/v1/jobs", status_code=202, summary="Queue a generation and return at once")
async def create_job(body: JobRequest, gw: GatewayDep, principal: PrincipalDep) -> JSONResponse:
    if (body.messages is None) == (body.prompt is None):
        raise InvalidRequestError("a job needs either messages (chat) or prompt (completion)",
                                  param="messages")
    submission = await prepare(gw, body, principal, messages=body.messages, prompt=body.prompt,
                               id_prefix=ID_PREFIXES["job"], live=False)
    await enqueue(gw, submission)
    fields = {k.encode(): v.encode() for k, v in submission.job_fields(gw.gateway_id).items()}
    view = _with_error_code(job_view(submission.id, fields, ""))
    location = f"/v1/jobs/{submission.id}"
    return JSONResponse(view, status_code=202, headers={"Location": location})


@router.get("/v1/jobs/{job_id}", summary="A job's status, text so far, counts and timings")
async def get_job(job_id: str, gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    return _with_error_code(await gw.jobs.get(_checked_id(job_id), principal))


@router.get("/v1/jobs/{job_id}/stream",
            summary="The job's tokens as SSE, from the start or after Last-Event-ID")
async def stream_job(job_id: str, gw: GatewayDep, principal: PrincipalDep,
                     last_event_id: Annotated[str | None, Header()] = None,
                     ) -> EventStreamResponse:
    fields = await gw.jobs.fields(_checked_id(job_id), principal)
    after_seq = _resume_after(last_event_id)
    if after_seq is not None and await has_ended_by(gw.redis, gw.keys, job_id, after_seq):
        return EventStreamResponse(_one_chunk(f"id: {after_seq}\n".encode() + DONE))
    kind: Kind = "chat" if str_field(fields, "kind") == "chat" else "completion"
    created = float(str_field(fields, "created_at") or 0)
    fmt = OpenAIFormat(kind=kind, id=job_id, model=str_field(fields, "model") or "",
                       created=int(created), include_usage=True)
    events = job_events(gw.redis, gw.keys, job_id,
                        after_seq=-1 if after_seq is None else after_seq)
    prompt_tokens = int(str_field(fields, "prompt_tokens") or 0)
    # A reader leaving does not cancel the job: only DELETE (or its own stream) does.
    return EventStreamResponse(openai_stream(
        events, fmt, request_id=job_id, prompt_tokens=prompt_tokens,
        on_close=lambda finished: None, keepalive_s=gw.settings.sse_keepalive_s,
        with_ids=True, is_resumed=after_seq is not None))


@router.delete("/v1/jobs/{job_id}", summary="Cancel a job")
async def cancel_job(job_id: str, gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    return _with_error_code(await gw.jobs.cancel(_checked_id(job_id), principal))
