"""Checks that need ``Settings`` or the model, and the sampling parameters they produce.

Every check raises ``InvalidRequestError`` with a message that says what to change; all of
them run before anything is written to Redis.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.schemas import MAX_INT32, ChatMessage, CompletionRequest, GenerationParams
from shared.errors import InvalidRequestError
from shared.protocol import SamplingParams
from shared.settings import Settings

_ROLE_FOR_TEMPLATE = {"developer": "system"}
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # choices per request  # most templates know only the classic roles


def check_supported(body: GenerationParams) -> None:
    """Reject OpenAI features this server does not implement, instead of ignoring them."""
    if body.n is not None and not 1 <= body.n <= MAX_N:
        raise InvalidRequestError(f"n must be 1 to {MAX_N}, got {body.n}", param="n")
    if (body.n or 1) > 1 and body.tools and body.tool_choice != "none":
        raise InvalidRequestError("n>1 with tools is not supported; send n=1", param="n")
    if body.functions:
        raise InvalidRequestError("functions (deprecated) are not supported; send tools",
                                  param="functions")
    if body.function_call not in (None, "none", "auto"):
        raise InvalidRequestError("function_call (deprecated) is not supported; send "
                                  "tool_choice", param="function_call")
    if isinstance(body, CompletionRequest):
        if body.echo and (body.n or 1) > 1:
            raise InvalidRequestError("echo with n>1 is not supported", param="echo")
        if body.echo and body.logprobs is not None:
            raise InvalidRequestError("echo with logprobs is not supported (no prompt "
                                      "logprobs); drop one of them", param="echo")
        if body.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != 1:
            raise InvalidRequestError("best_of>1 is not supported", param="best_of")


def logprobs_count(body: GenerationParams, *, is_chat: bool) -> int | None:
    """How many top alternatives each token's logprobs list (None: no logprobs).

    Chat: ``logprobs`` (bool) and ``top_logprobs`` (0-20, needs ``logprobs``); completions:
    ``logprobs`` as an integer 0-20 (OpenAI allows 5; vLLM 20)."""
    value, top = body.logprobs, body.top_logprobs
    if is_chat:
        if value is not None and not isinstance(value, bool):
            raise InvalidRequestError("logprobs must be true or false in chat completions; "
                                      "use top_logprobs for how many alternatives",
                                      param="logprobs")
        if top is not None and not value:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be 0 to {MAX_TOP_LOGPROBS}, got {top}",
                                      param="top_logprobs")
        return (top or 0) if value else None
    if isinstance(value, bool):
        raise InvalidRequestError("logprobs must be an integer 0 to 20 in completions "
                                  "(how many alternatives per token)", param="logprobs")
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be 0 to {MAX_TOP_LOGPROBS}, got {value}",
                                  param="logprobs")
    return value


def choices_count(body: GenerationParams, *, live: bool, num_prompt: int, max_tokens: int,
                  max_batch_tokens: int) -> int:
    """``n``: choices of one prompt (prefilled once on the worker). Only live chat and
    completion requests: a job's record and a batch line hold one text."""
    n = body.n or 1
    if n == 1:
        return 1
    if not live:
        raise InvalidRequestError("n>1 is supported on /v1/chat/completions and "
                                  "/v1/completions, not for jobs or batches", param="n")
    needed = n * (num_prompt + max_tokens)
    if 0 < max_batch_tokens < needed:
        raise InvalidRequestError(
            f"n={n} choices of prompt + max_tokens ({num_prompt} + {max_tokens}) need {needed} "
            f"cache tokens; the workers hold at most {max_batch_tokens} per request: lower n "
            "or max_tokens", param="n")
    return n


def stop_sequences(stop: str | list[str] | None, settings: Settings) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"at most {settings.max_stop_sequences} stop sequences are allowed, "
            f"got {len(stops)}", param="stop")
    for text in stops:
        if not text:
            raise InvalidRequestError("stop sequences must not be empty", param="stop")
        if len(text) > settings.max_stop_length:
            raise InvalidRequestError(
                f"each stop sequence must be at most {settings.max_stop_length} characters, "
                f"got one of {len(text)}", param="stop")
    return stops


def chat_messages(messages: list[ChatMessage], settings: Settings) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: role and a plain-text content (with an
    assistant's ``tool_calls`` and a tool message's ``tool_call_id`` when given)."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    if len(messages) > settings.max_messages:
        raise InvalidRequestError(
            f"at most {settings.max_messages} messages are allowed, got {len(messages)}",
            param="messages")
    rendered = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"messages[{i}]: only text content parts are supported, "
                        f"got {part.type!r}", param=f"messages[{i}].content")
                texts.append(part.text)
            content = "".join(texts)
        item: dict[str, Any] = {"role": _ROLE_FOR_TEMPLATE.get(message.role, message.role),
                                "content": content or ""}
        if message.name:
            item["name"] = message.name
        if message.tool_calls:
            item["tool_calls"] = _tool_calls(message.tool_calls, i)
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    if not any(item["content"] or item.get("tool_calls") for item in rendered):
        raise InvalidRequestError("messages must contain some text", param="messages")
    return rendered


def _tool_calls(calls: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, arguments as objects (as templates use them)."""
    out = []
    for j, call in enumerate(calls):
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                f"messages[{i}].tool_calls[{j}] needs function.name and function.arguments",
                param=f"messages[{i}].tool_calls")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise InvalidRequestError(
                    f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON",
                    param=f"messages[{i}].tool_calls") from None
        out.append({"id": call.get("id", ""), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def completion_prompt(prompt: str | list[object] | None) -> str:
    """The one prompt string of a completion request."""
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            raise InvalidRequestError(
                "prompts of token ids are not supported; send the prompt as a string",
                param="prompt")
        elif len(prompt) > 1:
            raise InvalidRequestError(
                "a list of several prompts is not supported; send one request per prompt",
                param="prompt")
        else:
            raise InvalidRequestError("prompt must be a string", param="prompt")
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    return prompt


def choose_max_tokens(requested: int | None, num_prompt: int, max_context: int,
                      settings: Settings, *, prompt_param: str,
                      max_batch_tokens: int = 0) -> int:
    """``max_tokens`` to generate: the client's if it fits, else the default capped to fit.

    A request must fit the model's context and, when the worker published it
    (``max_batch_tokens`` > 0), the worker's KV budget: prompt + max_tokens tokens of cache.
    """
    if num_prompt >= max_context:
        raise InvalidRequestError(
            f"prompt is {num_prompt} tokens, longer than the model's context of "
            f"{max_context}", param=prompt_param)
    if 0 < max_batch_tokens <= num_prompt:
        raise InvalidRequestError(
            f"prompt is {num_prompt} tokens, but the workers serving this model hold at most "
            f"{max_batch_tokens} tokens per request (prompt + max_tokens; their "
            f"TOKENFLEET_MAX_BATCH_TOKENS); shorten the prompt", param=prompt_param)
    room = max_context - num_prompt
    budget_room = max_batch_tokens - num_prompt if max_batch_tokens > 0 else room
    if requested is None:
        return min(settings.default_max_tokens, settings.max_tokens_cap, room, budget_room)
    check_max_tokens_range(requested, settings)
    if requested > room:
        raise InvalidRequestError(
            f"the prompt has {num_prompt} tokens and the model's context is {max_context} "
            f"tokens, so max_tokens must be <= {room} (got {requested})", param="max_tokens")
    if requested > budget_room:
        raise InvalidRequestError(
            f"the prompt has {num_prompt} tokens and the workers serving this model hold at "
            f"most {max_batch_tokens} tokens per request (prompt + max_tokens; their "
            f"TOKENFLEET_MAX_BATCH_TOKENS), so max_tokens must be <= {budget_room} "
            f"(got {requested}); lower max_tokens or shorten the prompt", param="max_tokens")
    return requested


def check_max_tokens_range(requested: int | None, settings: Settings) -> None:
    """The checks that need no model (run before any Redis call)."""
    if requested is None:
        return
    if requested < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {requested}",
                                  param="max_tokens")
    if requested > settings.max_tokens_cap:
        raise InvalidRequestError(
            f"max_tokens must be at most {settings.max_tokens_cap}, got {requested}",
            param="max_tokens")


def requested_max_tokens(body: GenerationParams) -> int | None:
    if body.max_tokens is not None:
        return body.max_tokens
    return body.max_completion_tokens


def check_stop_token_ids_count(body: GenerationParams, settings: Settings) -> None:
    """The count limit of ``stop_token_ids`` (no model needed; ranges need its vocabulary)."""
    count = len(body.stop_token_ids or ())
    if count > settings.max_stop_token_ids:
        raise InvalidRequestError(
            f"at most {settings.max_stop_token_ids} stop_token_ids are allowed, got {count}",
            param="stop_token_ids")


def usable_sampling_defaults(published: Mapping[str, float]) -> dict[str, float | int]:
    """The model's published defaults that the engine supports, in range (others dropped).

    A worker reads them from the checkpoint's ``generation_config.json``; a value the
    request schema would refuse is ignored rather than sent to every request."""
    usable: dict[str, float | int] = {}
    temperature = published.get("temperature")
    if temperature is not None and 0.0 <= temperature <= 2.0:
        usable["temperature"] = float(temperature)
    top_p = published.get("top_p")
    if top_p is not None and 0.0 < top_p <= 1.0:
        usable["top_p"] = float(top_p)
    top_k = published.get("top_k")
    if top_k is not None and top_k == int(top_k) and 0 <= top_k <= MAX_INT32:
        usable["top_k"] = int(top_k)
    return usable


def sampling_params(body: GenerationParams, *, max_tokens: int, stop: list[str],
                    vocab_size: int,
                    defaults: Mapping[str, float] | None = None) -> SamplingParams:
    """The worker's sampling parameters: the request's values, else the model's defaults
    (``defaults``: its published ``generation_defaults``), else the protocol's."""
    stop_ids = list(body.stop_token_ids or [])
    for token_id in stop_ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"stop_token_ids: {token_id} is not a token id of this model "
                f"(vocabulary of {vocab_size})", param="stop_token_ids")
    if body.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({body.min_tokens}) must be <= max_tokens ({max_tokens})",
            param="min_tokens")
    model = usable_sampling_defaults(defaults or {})
    base = SamplingParams()
    bias = logit_bias_pairs(body.logit_bias, vocab_size)
    temperature = _first(body.temperature, model.get("temperature"), base.temperature)
    top_p = _first(body.top_p, model.get("top_p"), base.top_p)
    top_k = int(_first(body.top_k, model.get("top_k"), base.top_k))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=0 if top_k < 0 or top_k >= vocab_size else top_k,  # -1 and >= vocab: off
        seed=body.seed,
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        presence_penalty=float(body.presence_penalty or 0.0),
        frequency_penalty=float(body.frequency_penalty or 0.0),
        repetition_penalty=float(_first(body.repetition_penalty, base.repetition_penalty)),
        logit_bias=bias,
        min_p=float(body.min_p or 0.0),
        speculative=body.speculative,
    )


def logit_bias_pairs(bias: Mapping[str, object] | None,
                     vocab_size: int) -> list[list[int | float]]:
    """OpenAI's ``{"token id": bias}`` as ``[[id, bias], ...]``; each bias in -100..100."""
    if not bias:
        return []
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}",
            param="logit_bias")
    pairs: list[list[int | float]] = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"logit_bias: {token} is not a token id of this model (vocabulary of "
                f"{vocab_size})", param="logit_bias")
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not -100 <= value <= 100):
            raise InvalidRequestError(
                f"logit_bias values must be numbers from -100 to 100, got {value!r} for "
                f"token {token}", param="logit_bias")
        pairs.append([token, float(value)])
    return pairs


def _first(*values: float | int | None) -> float | int:
    for value in values:
        if value is not None:
            return value
    raise AssertionError("the last value is never None")
