"""From an input line to a gateway submission, and from a finished job to an output line.

``submission`` runs the gateway's own ``prepare`` (the one call site of it in batches), so a
line is refused with exactly the messages ``/v1/chat/completions`` and ``/v1/completions``
give. Batch lines go to the ``batch`` lane and are not charged to the key's per-minute
limits (like OpenAI, batches have their own limits: file size and lines per batch).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from pydantic import ValidationError

from batches.input import InputLine
from gateway.auth import Principal
from gateway.errors import describe, validation_message
from gateway.openai_format import OpenAIFormat, Outcome
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.state import GatewayState
from gateway.submit import ID_PREFIXES, Submission, prepare
from shared.errors import InvalidRequestError, TokenfleetError
from shared.job_record import int_field, str_field

OUTPUT = b"o"  # first byte of a stored result: goes to the output file
ERROR = b"e"  # goes to the error file


def parse_body(line: InputLine) -> ChatCompletionRequest | CompletionRequest:
    """The body as the endpoint's request model, in the batch lane; refusals as the API's."""
    model = ChatCompletionRequest if line.url == "/v1/chat/completions" else CompletionRequest
    try:
        body = model.model_validate(line.body)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors()))
        raise InvalidRequestError(message, param=param) from None
    if body.stream:
        raise InvalidRequestError("stream is not supported in a batch; remove it or set it "
                                  "to false", param="stream")
    return body.model_copy(update={"lane": "batch", "priority": None})


async def submission(gw: GatewayState, line: InputLine, owner: str) -> Submission:
    """Validate and tokenize one line (nothing written); the gateway's errors propagate."""
    body = parse_body(line)
    principal = Principal(owner=owner)  # rpm = tpm = 0: batch lines are not rate limited
    if isinstance(body, ChatCompletionRequest):
        return await prepare(gw, body, principal, messages=body.messages, prompt=None,
                             id_prefix=ID_PREFIXES["job"], live=False)
    return await prepare(gw, body, principal, messages=None, prompt=body.prompt,
                         id_prefix=ID_PREFIXES["job"], live=False)


def _line(custom_id: str, status_code: int, request_id: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
                       "response": {"status_code": status_code, "request_id": request_id,
                                    "body": body},
                       "error": None}, separators=(",", ":")).encode()


def refused(custom_id: str, exc: TokenfleetError) -> bytes:
    """A line the gateway refused when it was submitted (e.g. its model went away)."""
    status, body = describe(exc)
    return ERROR + _line(custom_id, status, "", body)


def from_job(custom_id: str, job_id: str, fields: dict[bytes, bytes],
             text: bytes | None) -> tuple[bytes, int, int]:
    """The stored result of a finished job, and its prompt and completion token counts."""
    prompt_tokens = int_field(fields, "prompt_tokens") or 0
    completion_tokens = int_field(fields, "completion_tokens") or 0
    status = str_field(fields, "status")
    if status != "succeeded":
        message = str_field(fields, "error") or f"the request ended as {status}"
        body = {"error": {"message": message, "type": "server_error", "param": None,
                          "code": "generation_failed"}}
        return ERROR + _line(custom_id, 500, job_id, body), prompt_tokens, completion_tokens
    fmt = OpenAIFormat.for_job(job_id, fields)
    outcome = Outcome(text=(text or b"").decode("utf-8", "replace"),
                      finish_reason=str_field(fields, "finish_reason") or "stop",
                      prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return OUTPUT + _line(custom_id, 200, job_id, fmt.response(outcome)), prompt_tokens, \
        completion_tokens


def unfinished(custom_id: str, code: str, message: str) -> bytes:
    """An error-file line for a request that never ran (OpenAI's ``batch_expired``)."""
    return json.dumps({"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
                       "response": None, "error": {"code": code, "message": message}},
                      separators=(",", ":")).encode()
