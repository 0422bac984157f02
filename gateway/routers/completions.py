"""``POST /v1/completions``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from gateway.deps import GatewayDep, PrincipalDep
from gateway.generation import respond
from gateway.idempotency import Claim
from gateway.replay import replay_generation, submit_once
from gateway.schemas import CompletionRequest
from gateway.submit import ID_PREFIXES, prepare

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", summary="Create a text completion (OpenAI-compatible)")
async def create_completion(body: CompletionRequest, gw: GatewayDep,
                            principal: PrincipalDep, request: Request,
                            idempotency_key: Annotated[str | None, Header()] = None,
                            ) -> Response:
    async def submit(claim: Claim | None) -> Response:
        submission = await prepare(gw, body, principal, messages=None, prompt=body.prompt,
                                   id_prefix=ID_PREFIXES["completion"], live=True)
        submission.idempotency = claim
        return await respond(gw, submission, request.receive)

    return await submit_once(
        gw, principal, request, idempotency_key, submit=submit,
        replay=lambda job_id: replay_generation(gw, principal, job_id, stream=body.stream,
                                                include_usage=body.include_usage))
