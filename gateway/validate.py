"""Checks that need ``Settings`` or the model, and the sampling parameters they produce.

Every check raises ``InvalidRequestError`` with a message that says what to change; all of
them run before anything is written to Redis.
"""

from __future__ import annotations

from gateway.schemas import ChatMessage, CompletionRequest, GenerationParams
from shared.errors import InvalidRequestError
from shared.protocol import SamplingParams
from shared.settings import Settings

_ROLE_FOR_TEMPLATE = {"developer": "system"}  # most templates know only the classic roles


def check_supported(body: GenerationParams) -> None:
    """Reject OpenAI features this server does not implement, instead of ignoring them."""
    if body.n is not None and body.n != 1:
        raise InvalidRequestError("n>1 is not supported" if body.n > 1 else "n must be 1",
                                  param="n")
    if (body.logprobs is not None and body.logprobs is not False) or body.top_logprobs:
        raise InvalidRequestError("logprobs are not supported", param="logprobs")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise InvalidRequestError(f"{name} are not supported (no function calling)",
                                      param=name)
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none", "auto"):  # "auto" with no tools: none
            raise InvalidRequestError(f"{name} is not supported (no function calling)",
                                      param=name)
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise InvalidRequestError("response_format other than text is not supported",
                                  param="response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise InvalidRequestError(f"{name} is not supported", param=name)
    if body.logit_bias:
        raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if body.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != 1:
            raise InvalidRequestError("best_of>1 is not supported", param="best_of")


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


def chat_messages(messages: list[ChatMessage], settings: Settings) -> list[dict[str, str]]:
    """Messages as the chat template expects them: role and a plain-text content."""
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
        item = {"role": _ROLE_FOR_TEMPLATE.get(message.role, message.role),
                "content": content or ""}
        if message.name:
            item["name"] = message.name
        rendered.append(item)
    if not any(item["content"] for item in rendered):
        raise InvalidRequestError("messages must contain some text", param="messages")
    return rendered


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
                      settings: Settings, *, prompt_param: str) -> int:
    """``max_tokens`` to generate: the client's if it fits, else the default capped to fit."""
    if num_prompt >= max_context:
        raise InvalidRequestError(
            f"prompt is {num_prompt} tokens, longer than the model's context of "
            f"{max_context}", param=prompt_param)
    room = max_context - num_prompt
    if requested is None:
        return min(settings.default_max_tokens, settings.max_tokens_cap, room)
    check_max_tokens_range(requested, settings)
    if requested > room:
        raise InvalidRequestError(
            f"the prompt has {num_prompt} tokens and the model's context is {max_context} "
            f"tokens, so max_tokens must be <= {room} (got {requested})", param="max_tokens")
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


def sampling_params(body: GenerationParams, *, max_tokens: int, stop: list[str],
                    vocab_size: int) -> SamplingParams:
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
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        seed=body.seed,
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
    )
