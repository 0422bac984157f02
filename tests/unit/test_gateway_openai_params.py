"""The OpenAI parameters the gateway turns into sampling parameters: penalties, logit_bias,
min_p, logprobs; and the 400s that name what to change."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from gateway.generation import collect
from gateway.openai_format import OpenAIFormat, Outcome
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.sse import encode_event
from gateway.structured import guided_spec
from gateway.validate import choices_count, logprobs_count, sampling_params
from shared.errors import InvalidRequestError
from shared.protocol import EVENT_DONE, EVENT_TOKEN, TokenEvent, pack_events, unpack_events


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


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields})


def test_logprobs_counts_per_kind() -> None:
    assert logprobs_count(chat(), is_chat=True) is None
    assert logprobs_count(chat(logprobs=True), is_chat=True) == 0
    assert logprobs_count(chat(logprobs=True, top_logprobs=5), is_chat=True) == 5
    assert logprobs_count(chat(logprobs=False), is_chat=True) is None
    assert logprobs_count(completion(logprobs=3), is_chat=False) == 3
    assert logprobs_count(completion(), is_chat=False) is None


@pytest.mark.parametrize(("body", "is_chat", "param", "message"), [
    ({"top_logprobs": 2}, True, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, True, "top_logprobs", "0 to 20"),
    ({"logprobs": 2}, True, "logprobs", "true or false"),
    ({"logprobs": 21}, False, "logprobs", "0 to 20"),
    ({"logprobs": True}, False, "logprobs", "an integer"),
])
def test_bad_logprobs_are_400s(body: dict[str, object], is_chat: bool, param: str,
                               message: str) -> None:
    request = chat(**body) if is_chat else completion(**body)
    with pytest.raises(InvalidRequestError, match=message) as info:
        logprobs_count(request, is_chat=is_chat)
    assert info.value.param == param


ENTRIES = [["He", -0.5, [["He", -0.5], ["She", -1.5]]], ["llo", -0.25, [["llo", -0.25]]]]


def test_chat_logprobs_shape() -> None:
    fmt = OpenAIFormat(kind="chat", id="c", model="m", created=0, wants_logprobs=True)
    body = fmt.response(Outcome("Hello", "stop", 3, 2, logprobs=ENTRIES))
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["He", "llo"]
    assert content[0]["bytes"] == list(b"He") and content[0]["logprob"] == -0.5
    assert content[0]["top_logprobs"][1] == {"token": "She", "logprob": -1.5,
                                             "bytes": list(b"She")}
    chunk = fmt.delta_chunk("He", ENTRIES[:1])
    assert chunk["choices"][0]["logprobs"]["content"][0]["token"] == "He"
    plain = OpenAIFormat(kind="chat", id="c", model="m", created=0)
    assert plain.response(Outcome("Hello", "stop", 3, 2))["choices"][0]["logprobs"] is None


def test_completion_logprobs_shape_and_streamed_offsets() -> None:
    fmt = OpenAIFormat(kind="completion", id="c", model="m", created=0, wants_logprobs=True)
    body = fmt.response(Outcome("Hello", "stop", 3, 2, logprobs=ENTRIES))
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["He", "llo"] and lp["token_logprobs"] == [-0.5, -0.25]
    assert lp["top_logprobs"][0] == {"He": -0.5, "She": -1.5}
    assert lp["text_offset"] == [0, 2]
    stream = OpenAIFormat(kind="completion", id="c", model="m", created=0, wants_logprobs=True)
    first = stream.delta_chunk("He", ENTRIES[:1])["choices"][0]["logprobs"]
    second = stream.delta_chunk("llo", ENTRIES[1:])["choices"][0]["logprobs"]
    assert first["text_offset"] == [0] and second["text_offset"] == [2]


def test_a_token_event_with_logprobs_but_held_text_is_still_streamed() -> None:
    fmt = OpenAIFormat(kind="chat", id="c", model="m", created=0, wants_logprobs=True)
    event = TokenEvent("c", 1, EVENT_TOKEN, text="", token_ids=[5], logprobs=ENTRIES[:1])
    assert b'"logprobs":{"content":[{"token":"He"' in encode_event(
        event, fmt, request_id="c", prompt_tokens=1)
    back = unpack_events(pack_events([event]))[0]
    assert back.logprobs == ENTRIES[:1]


def test_structured_output_specs() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert guided_spec(chat()) == ("", "")
    assert guided_spec(chat(response_format={"type": "text"})) == ("", "")
    assert guided_spec(chat(response_format={"type": "json_object"})) == ("json_object", "")
    kind, value = guided_spec(chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}))
    assert kind == "json_schema" and json.loads(value) == schema
    assert guided_spec(chat(guided_json=json.dumps(schema)))[0] == "json_schema"
    assert guided_spec(chat(guided_regex="[a-z]+")) == ("regex", "[a-z]+")
    assert guided_spec(chat(guided_choice=["a", "b"])) == ("choice", '["a", "b"]')


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"response_format": {"type": "xml"}}, "response_format", "text, json_object or json_"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "needs a json_schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "is missing"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integr"}}}}}},
     "response_format.json_schema.schema", "not a valid JSON Schema at properties/a/type"),
    ({"guided_json": "{nope"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "not a valid regular expression"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "use only one of"),
])
def test_bad_structured_outputs_are_400s_naming_the_problem(
        fields: dict[str, object], param: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        guided_spec(chat(**fields))
    assert info.value.param == param


def test_echo_puts_the_prompt_before_the_completion_whole_and_streamed() -> None:
    fmt = OpenAIFormat(kind="completion", id="c", model="m", created=0, echo="Once upon")
    assert fmt.response(Outcome(" a time", "length", 2, 2))["choices"][0]["text"] == \
        "Once upon a time"
    first = fmt.role_chunk()
    assert first is not None and first["choices"][0]["text"] == "Once upon"
    assert OpenAIFormat(kind="completion", id="c", model="m", created=0).role_chunk() is None
    record = {b"kind": b"completion", b"model": b"m", b"echo": b"Once upon"}
    assert OpenAIFormat.for_job("c", record).echo == "Once upon"


def test_choices_count() -> None:
    assert choices_count(chat(), live=True, num_prompt=5, max_tokens=10,
                         max_batch_tokens=0) == 1
    assert choices_count(chat(n=3), live=True, num_prompt=5, max_tokens=10,
                         max_batch_tokens=100) == 3
    with pytest.raises(InvalidRequestError, match="not for jobs or batches"):
        choices_count(chat(n=2), live=False, num_prompt=5, max_tokens=10, max_batch_tokens=0)
    with pytest.raises(InvalidRequestError, match="need 60 cache tokens"):
        choices_count(chat(n=4), live=True, num_prompt=5, max_tokens=10, max_batch_tokens=50)


async def test_n_choices_are_collected_by_index_and_shown_in_order() -> None:
    async def events() -> AsyncIterator[TokenEvent]:
        yield TokenEvent("c", 0, EVENT_TOKEN, text="a", index=0)
        yield TokenEvent("c", 1, EVENT_TOKEN, text="x", index=1)
        yield TokenEvent("c", 2, EVENT_TOKEN, text="y", index=1, finish_reason="stop")
        yield TokenEvent("c", 3, EVENT_TOKEN, text="b", index=0, finish_reason="length")
        yield TokenEvent("c", 4, EVENT_DONE, finish_reason="length", completion_tokens=4)

    outcome = await collect(events(), 3)
    body = OpenAIFormat(kind="chat", id="c", model="m", created=0, n=2).response(outcome)
    assert [(c["index"], c["message"]["content"], c["finish_reason"])
            for c in body["choices"]] == [(0, "ab", "length"), (1, "xy", "stop")]
    assert body["usage"]["completion_tokens"] == 4


def test_n_choices_stream_under_their_index_with_their_own_finish() -> None:
    fmt = OpenAIFormat(kind="completion", id="c", model="m", created=0, n=2)
    ended = TokenEvent("c", 5, EVENT_TOKEN, text="z", index=1, finish_reason="stop")
    chunks = [json.loads(line[6:]) for line in
              encode_event(ended, fmt, request_id="c", prompt_tokens=1).decode().split("\n\n")
              if line]
    assert [(c["choices"][0]["index"], c["choices"][0]["text"],
             c["choices"][0]["finish_reason"]) for c in chunks] == [(1, "z", None),
                                                                     (1, "", "stop")]
    done = TokenEvent("c", 6, EVENT_DONE, finish_reason="stop", completion_tokens=2)
    assert encode_event(done, fmt, request_id="c", prompt_tokens=1).endswith(b"[DONE]\n\n")
    assert b'"finish_reason"' not in encode_event(done, fmt, request_id="c", prompt_tokens=1)


@pytest.mark.parametrize("schema", [{"$schema": []}, {"type": "object", "$schema": {"a": 1}}])
def test_odd_schemas_are_400s_not_500s(schema: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError, match="not a valid JSON Schema"):
        guided_spec(chat(guided_json=schema))
