"""``POST /v1/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.deps import GatewayDep, PrincipalDep
from gateway.generation import respond
from gateway.schemas import CompletionRequest
from gateway.submit import ID_PREFIXES, prepare

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", summary="Create a text completion (OpenAI-compatible)")
async def create_completion(body: CompletionRequest, gw: GatewayDep,
                            principal: PrincipalDep, request: Request) -> Response:
    submission = await prepare(gw, body, principal, messages=None, prompt=body.prompt,
                               id_prefix=ID_PREFIXES["completion"], live=True)
    return await respond(gw, submission, request.receive)
