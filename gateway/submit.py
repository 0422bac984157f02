"""From a validated body to a queued request: tokenize, size, and enqueue atomically.

``enqueue`` writes the job hash and the stream entry in one script (``ENQUEUE_LUA``), with
the job's queue number, its entry in the key's job index and its ``Idempotency-Key``
binding, so a request is either fully queued or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from gateway.auth import Principal
from gateway.idempotency import Claim, IdempotentReplay, mismatch
from gateway.openai_format import Kind
from gateway.schemas import ChatMessage, GenerationParams
from gateway.state import GatewayState
from gateway.structured import guided_spec
from gateway.tokenize import PromptTokenizer
from gateway.tools import ToolPlan, plan_tools, with_tool_prompt
from gateway.validate import (
    chat_messages,
    check_max_tokens_range,
    check_stop_token_ids_count,
    check_supported,
    choices_count,
    choose_max_tokens,
    completion_prompt,
    logprobs_count,
    requested_max_tokens,
    sampling_params,
    stop_sequences,
)
from shared.errors import InvalidRequestError, RateLimitedError, ServiceUnavailableError
from shared.job_record import ENQUEUE_LUA, STATUS_QUEUED, JobRecord
from shared.protocol import GenerateRequest, pack

ID_PREFIXES: dict[str, str] = {"chat": "chatcmpl", "completion": "cmpl", "job": "job"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass(slots=True)
class Submission:
    request: GenerateRequest
    kind: Kind
    stream: bool
    include_usage: bool
    idempotency: Claim | None = None  # bound to the job by enqueue
    is_listed: bool = False  # in the key's job index (GET /v1/jobs): jobs, not chat
    webhook: str | None = None
    webhook_events: str | None = None  # comma-separated filter
    tool_mode: str = ""  # how the answer's tool calls are parsed (gateway.tools)
    echo: str = ""  # completions with echo: the prompt, shown before the completion

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def job_fields(self, gateway_id: str) -> dict[str, str]:
        request = self.request
        return JobRecord(
            status=STATUS_QUEUED, model=request.model, owner=request.owner, kind=self.kind,
            lane=request.lane, stream=self.stream, created_at=request.created_at,
            prompt_tokens=self.num_prompt_tokens, max_tokens=request.params.max_tokens,
            gateway=gateway_id, webhook=self.webhook, webhook_events=self.webhook_events,
            idempotency=self.idempotency.key if self.idempotency else None,
            tool_mode=self.tool_mode or None, echo=self.echo or None,
        ).to_mapping()


async def prepare(gw: GatewayState, body: GenerationParams, principal: Principal, *,
                  messages: list[ChatMessage] | None, prompt: str | list[object] | None,
                  id_prefix: str, live: bool) -> Submission:
    """Validate and tokenize; nothing is written to Redis here."""
    if gw.is_shutting_down:
        raise ServiceUnavailableError("this gateway is shutting down; retry on another one")
    settings = gw.settings
    check_supported(body)
    requested = requested_max_tokens(body)
    check_max_tokens_range(requested, settings)
    check_stop_token_ids_count(body, settings)
    stop = stop_sequences(body.stop, settings)
    chat = chat_messages(messages, settings) if messages is not None else None
    text = completion_prompt(prompt) if chat is None else None
    tools = plan_tools(body.tools, body.tool_choice) if chat is not None else ToolPlan()
    if chat is None and body.tools:
        raise InvalidRequestError("tools need a chat request (messages)", param="tools")

    model = await gw.catalog.resolve_model(body.model)
    entry = await gw.catalog.model(model)
    kind: Kind = "chat" if chat is not None else "completion"
    param = "messages" if chat is not None else "prompt"
    template_tools = tools.tools or None
    if chat is not None and tools.tools and not entry.tokenizer.knows_tools:
        chat, template_tools = with_tool_prompt(chat, tools.tools), None
    token_ids = await encode(entry.tokenizer, chat, text, settings.tokenize_inline_chars,
                             template_tools)
    if not token_ids:
        raise InvalidRequestError(f"{param} is empty after tokenization", param=param)
    info = entry.info
    max_tokens = choose_max_tokens(requested, len(token_ids), info.max_context, settings,
                                   prompt_param=param, max_batch_tokens=info.max_batch_tokens)
    params = sampling_params(body, max_tokens=max_tokens, stop=stop,
                             vocab_size=info.vocab_size, defaults=info.generation_defaults)
    params.logprobs = logprobs_count(body, is_chat=chat is not None)
    params.n = choices_count(body, live=live, num_prompt=len(token_ids), max_tokens=max_tokens,
                             max_batch_tokens=info.max_batch_tokens)
    params.guided_kind, params.guided_value = guided_spec(body)
    if tools.grammar[0]:
        if params.guided_kind:
            raise InvalidRequestError("tool_choice required or a named function already "
                                      "constrains the output; drop response_format/guided_*",
                                      param="tool_choice")
        params.guided_kind, params.guided_value = tools.grammar
    if params.seed is None and not params.is_greedy:
        params.seed = secrets.randbits(63)  # a retry after a worker crash samples the same text
    try:
        await gw.backlog.check(model)  # before the rate limiter spends the key's budget
    except RateLimitedError:
        gw.metrics.on_throttled("backlog")
        raise
    decision = await gw.limiter.check(principal.owner, principal.rpm, principal.tpm,
                                      len(token_ids) + params.n * max_tokens)
    if not decision.allowed:
        gw.metrics.on_throttled("rate_limit")
        raise RateLimitedError(decision.reason, retry_after_s=decision.retry_after_s)
    now = time.time()
    timeout_s = body.timeout or settings.request_timeout_s
    request = GenerateRequest(
        id=new_id(id_prefix),
        model=model,
        prompt_token_ids=token_ids,
        params=params,
        reply_channel=gw.reply_channel if live else "",
        lane=body.requested_lane,
        owner=principal.owner,
        created_at=now,
        deadline=now + timeout_s if timeout_s else None,
    )
    return Submission(request=request, kind=kind, stream=body.stream,
                      include_usage=body.include_usage, tool_mode=tools.mode,
                      echo=text if text is not None and getattr(body, "echo", False) else "")


async def encode(tokenizer: PromptTokenizer, chat: list[dict[str, Any]] | None,
                 text: str | None, inline_chars: int,
                 tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the prompt; a long one is templated and tokenized in a worker thread, so
    one huge prompt does not stall every other request and stream of this gateway."""
    if chat is not None:
        size = sum(len(message["content"] or "") for message in chat)
        size += len(json.dumps(tools)) if tools else 0
        run = functools.partial(tokenizer.encode_chat, chat, tools)
    else:
        assert text is not None
        size = len(text)
        run = functools.partial(tokenizer.encode_prompt, text)
    if size <= inline_chars:
        return run()
    return await asyncio.to_thread(run)


async def enqueue(gw: GatewayState, submission: Submission) -> None:
    """Job hash, stream entry, index entry and idempotency binding in one script; on failure
    nothing is left behind. ``IdempotentReplay`` when the submission's ``Idempotency-Key``
    is already bound to a job (a concurrent retry queued first): nothing was written."""
    request = submission.request
    keys = gw.keys
    settings = gw.settings
    job_key = keys.job(request.id)
    claim = submission.idempotency
    items = [part for pair in submission.job_fields(gw.gateway_id).items() for part in pair]
    script = gw.script(ENQUEUE_LUA)
    try:
        queued, job_id, bound_fingerprint = await script(
            keys=[job_key, keys.requests_stream(request.model, request.lane),
                  keys.queue_added(request.model, request.lane), keys.owner_jobs(request.owner),
                  claim.key if claim else keys.idempotency(request.owner, "none")],
            args=[settings.job_ttl_s, settings.stream_maxlen, pack(request),
                  repr(request.created_at), int(submission.is_listed),
                  repr(request.created_at - settings.job_ttl_s), claim.ttl_s if claim else 0,
                  claim.fingerprint if claim else "", request.id, *items])
    except ResponseError:
        # The script failed after a write (Redis has no rollback): remove the job record.
        with contextlib.suppress(RedisError):
            await gw.redis.delete(job_key)
        raise
    if not queued:
        assert claim is not None
        if bound_fingerprint.decode() != claim.fingerprint:
            raise mismatch()
        raise IdempotentReplay(job_id.decode())
    gw.metrics.on_submitted(request.model, submission.kind, request.lane)
