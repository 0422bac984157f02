"""The OpenAI parameters the gateway turns into sampling parameters: penalties, logit_bias,
min_p, logprobs; and the 400s that name what to change."""

from __future__ import annotations

import pytest

from gateway.schemas import ChatCompletionRequest
from gateway.validate import sampling_params
from shared.errors import InvalidRequestError


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_penalties_bias_and_min_p_reach_the_sampling_params() -> None:
    params = sampling_params(
        chat(presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2, min_p=0.05,
             logit_bias={"3": -100, "7": 2.5}), max_tokens=7, stop=[], vocab_size=10)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert (params.repetition_penalty, params.min_p) == (1.2, 0.05)
    assert params.logit_bias == [[3, -100.0], [7, 2.5]]


def test_unused_controls_are_off() -> None:
    params = sampling_params(chat(), max_tokens=7, stop=[], vocab_size=10)
    assert not params.has_penalties and not params.logit_bias and params.min_p == 0.0
    assert params.logprobs is None


@pytest.mark.parametrize(("bias", "message"), [
    ({"x": 1}, "keys must be token ids"),
    ({"10": 1}, "10 is not a token id of this model"),
    ({"3": 101}, "from -100 to 100"),
    ({"3": "a"}, "from -100 to 100"),
])
def test_bad_logit_bias_is_a_400_naming_it(bias: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        sampling_params(chat(logit_bias=bias), max_tokens=7, stop=[], vocab_size=10)
    assert info.value.param == "logit_bias"


@pytest.mark.parametrize("fields", [{"presence_penalty": 2.5}, {"frequency_penalty": -3},
                                    {"repetition_penalty": 0}, {"min_p": 1.5}])
def test_out_of_range_controls_fail_validation(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        chat(**fields)
