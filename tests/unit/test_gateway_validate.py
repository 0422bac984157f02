"""Request checks that need settings or the model (no Redis, no app)."""

from __future__ import annotations

import pytest

from gateway.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from gateway.validate import (
    chat_messages,
    check_stop_token_ids_count,
    check_supported,
    choose_max_tokens,
    completion_prompt,
    sampling_params,
    stop_sequences,
    usable_sampling_defaults,
)
from shared.errors import InvalidRequestError
from shared.settings import Settings

SETTINGS = Settings(default_max_tokens=100, max_tokens_cap=1000, max_messages=3)


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_default_max_tokens_is_capped_to_the_context() -> None:
    assert choose_max_tokens(None, 10, 2048, SETTINGS, prompt_param="prompt") == 100
    assert choose_max_tokens(None, 2000, 2048, SETTINGS, prompt_param="prompt") == 48
    assert choose_max_tokens(48, 2000, 2048, SETTINGS, prompt_param="prompt") == 48


@pytest.mark.parametrize(("requested", "num_prompt", "message"), [
    (None, 2048, "prompt is 2048 tokens, longer than the model's context of 2048"),
    (0, 10, "max_tokens must be at least 1"),
    (1001, 10, "max_tokens must be at most 1000"),
    (49, 2000, "the prompt has 2000 tokens and the model's context is 2048 tokens, so "
               "max_tokens must be <= 48 (got 49)"),
])
def test_max_tokens_errors(requested: int | None, num_prompt: int, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        choose_max_tokens(requested, num_prompt, 2048, SETTINGS, prompt_param="prompt")
    assert str(info.value).startswith(message)


def test_completion_prompt_forms() -> None:
    assert completion_prompt("a") == "a"
    assert completion_prompt(["a"]) == "a"
    for bad, message in [("", "must not be empty"), ([], "must be a string"),
                         (["a", "b"], "several prompts"), ([1, 2], "token ids"),
                         ([["a"]], "must be a string")]:
        with pytest.raises(InvalidRequestError, match=message):
            completion_prompt(bad)


def test_stop_sequences() -> None:
    assert stop_sequences(None, SETTINGS) == []
    assert stop_sequences("x", SETTINGS) == ["x"]
    with pytest.raises(InvalidRequestError, match="must not be empty"):
        stop_sequences([""], SETTINGS)
    with pytest.raises(InvalidRequestError, match="at most 8"):
        stop_sequences(["a"] * 9, SETTINGS)


def test_chat_messages_flatten_text_parts_and_map_developer() -> None:
    messages = [ChatMessage.model_validate({"role": "developer", "content": "be brief"}),
                ChatMessage.model_validate({"role": "user", "content": [
                    {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})]
    assert chat_messages(messages, SETTINGS) == [{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "ab"}]
    with pytest.raises(InvalidRequestError, match="at most 3 messages"):
        chat_messages(messages * 2, SETTINGS)
    with pytest.raises(InvalidRequestError, match="some text"):
        chat_messages([ChatMessage(role="user", content="")], SETTINGS)


@pytest.mark.parametrize(("fields", "message"), [
    ({"n": 17}, "n must be 1 to 16"),
    ({"n": 0}, "n must be 1 to 16"),
    ({"n": 2, "tools": [{"type": "function"}]}, "n>1 with tools"),
    ({"functions": [{"name": "f"}]}, "functions .deprecated. are not supported"),
])
def test_unsupported_features_are_rejected(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        check_supported(chat(**fields))


def test_supported_defaults_pass() -> None:
    check_supported(chat(n=1, logprobs=False, presence_penalty=0, response_format={"type": "text"}))
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True})
    check_supported(body)
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True,
                                             "logprobs": 1})
    with pytest.raises(InvalidRequestError, match="echo with logprobs"):
        check_supported(body)


def test_sampling_params() -> None:
    params = sampling_params(chat(temperature=0, top_k=-1, seed=3, ignore_eos=True,
                                  stop_token_ids=[5]), max_tokens=7, stop=["s"], vocab_size=10)
    assert (params.max_tokens, params.temperature, params.top_k, params.seed) == (7, 0.0, 0, 3)
    assert params.is_greedy and params.ignore_eos and params.stop == ["s"]
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        sampling_params(chat(min_tokens=8), max_tokens=7, stop=[], vocab_size=10)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        sampling_params(chat(stop_token_ids=[10]), max_tokens=7, stop=[], vocab_size=10)


# --- bounds, the worker's KV budget, the model's sampling defaults ---------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", 2**70), ("top_k", -2), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("min_tokens", 2**31), ("min_tokens", -1), ("temperature", 2.5), ("top_p", 0.0),
    ("timeout", 86_401), ("timeout", 0),
])
def test_numbers_the_worker_cannot_take_are_refused_by_name(field: str, value: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        chat(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_stop_token_ids_count_is_bounded() -> None:
    check_stop_token_ids_count(chat(stop_token_ids=[1] * 64), SETTINGS)
    with pytest.raises(InvalidRequestError, match="at most 64 stop_token_ids") as info:
        check_stop_token_ids_count(chat(stop_token_ids=[1] * 65), SETTINGS)
    assert info.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequestError, match="not a token id"):
        sampling_params(chat(stop_token_ids=[2**70]), max_tokens=7, stop=[], vocab_size=10)


def test_kv_budget_caps_the_default_and_refuses_what_never_fits() -> None:
    budget = {"prompt_param": "prompt", "max_batch_tokens": 300}
    assert choose_max_tokens(None, 250, 2048, SETTINGS, **budget) == 50  # type: ignore[arg-type]
    assert choose_max_tokens(50, 250, 2048, SETTINGS, **budget) == 50  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError) as info:
        choose_max_tokens(51, 250, 2048, SETTINGS, **budget)  # type: ignore[arg-type]
    assert info.value.param == "max_tokens"
    assert "hold at most 300 tokens per request" in info.value.message
    assert "max_tokens must be <= 50 (got 51)" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        choose_max_tokens(None, 300, 2048, SETTINGS, **budget)  # type: ignore[arg-type]
    assert info.value.param == "prompt" and "shorten the prompt" in info.value.message
    # 0: the worker did not say (an older one): only the context limits
    assert choose_max_tokens(None, 250, 2048, SETTINGS, prompt_param="prompt") == 100


def test_unset_sampling_fields_take_the_models_defaults() -> None:
    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 40.0}
    params = sampling_params(chat(), max_tokens=7, stop=[], vocab_size=100, defaults=defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.9, 40)
    own = sampling_params(chat(temperature=1.0, top_p=1.0, top_k=0), max_tokens=7, stop=[],
                          vocab_size=100, defaults=defaults)
    assert (own.temperature, own.top_p, own.top_k) == (1.0, 1.0, 0)  # the request wins
    none = sampling_params(chat(), max_tokens=7, stop=[], vocab_size=100)
    assert (none.temperature, none.top_p, none.top_k) == (1.0, 1.0, 0)
    huge = sampling_params(chat(top_k=1000), max_tokens=7, stop=[], vocab_size=100)
    assert huge.top_k == 0  # at least the vocabulary: no filter


def test_out_of_range_published_defaults_are_ignored() -> None:
    assert usable_sampling_defaults({"temperature": 5.0, "top_p": 0.0, "top_k": 2.5,
                                     "min_p": 0.1, "repetition_penalty": 1.1}) == {}
    assert usable_sampling_defaults({"temperature": 0.0, "top_k": 50.0}) == {
        "temperature": 0.0, "top_k": 50}
