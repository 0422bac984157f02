"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.deps import GatewayDep, PrincipalDep
from gateway.generation import respond
from gateway.schemas import ChatCompletionRequest
from gateway.submit import ID_PREFIXES, prepare

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", summary="Create a chat completion (OpenAI-compatible)")
async def create_chat_completion(body: ChatCompletionRequest, gw: GatewayDep,
                                 principal: PrincipalDep, request: Request) -> Response:
    submission = await prepare(gw, body, principal, messages=body.messages, prompt=None,
                               id_prefix=ID_PREFIXES["chat"], live=True)
    return await respond(gw, submission, request.receive)
