"""Issue 16 through the real fleet with the official ``openai`` client: structured outputs
(``chat.completions.parse`` with a pydantic model), a tool call round trip, logprobs,
sampling controls and echo."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel

from tests.integration.fleet import Fleet, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("fleet"),
                       TOKENFLEET_MAX_BATCH_SIZE="16") as fleet:
        yield fleet


@pytest.fixture
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", timeout=300,
                         max_retries=0)


class Address(BaseModel):
    city: str
    zip_code: int


class Person(BaseModel):
    name: str
    age: int
    address: Address


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    # room for a sampled object: in fp32 (AVX2 CPUs) seed 1 writes 67 tokens, in bf16 fewer
    done = client.chat.completions.parse(
        model=MODEL, max_tokens=200, temperature=0.7, seed=1,
        messages=[{"role": "user", "content": "Describe a person who lives in Paris."}],
        response_format=Person)
    person = done.choices[0].message.parsed
    assert isinstance(person, Person), done.choices[0].message.content


def test_json_object_answers_a_json_object(client: openai.OpenAI) -> None:
    obj = client.chat.completions.create(
        model=MODEL, max_tokens=40, temperature=0,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"})
    text = obj.choices[0].message.content or ""
    assert text.startswith("{"), text
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_a_streamed_schema_parses(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "score": {"type": "integer", "minimum": 0,
                                                         "maximum": 10}},
              "required": ["answer", "score"], "additionalProperties": False}
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=60, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "a", "schema": schema, "strict": True}})
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    got = json.loads(text)
    assert got["answer"] in ("yes", "no") and isinstance(got["score"], int)


def test_guided_choice_and_a_bad_schema_400(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "Pick one."}],
        extra_body={"guided_choice": ["red", "green", "blue"]})
    assert done.choices[0].message.content in ("red", "green", "blue")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "a", "schema": {"type": "object", "required": "a"}}})
    assert "not a valid JSON Schema" in str(info.value)


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    done = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                          messages=messages, logprobs=True, top_logprobs=3)
    content = done.choices[0].logprobs.content
    assert content and len(content) <= 8
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-4  # greedy: the top one
    assert "".join(i.token for i in content).strip() != ""
    stream = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                            messages=messages, logprobs=True, top_logprobs=3,
                                            stream=True)
    streamed = [i for c in stream if c.choices and c.choices[0].logprobs
                for i in c.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 3)) for i in streamed] == \
        [(i.token, round(i.logprob, 3)) for i in content]


def test_completion_logprobs(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=5, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) <= 5
    assert all(math.exp(v) <= 1.0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == done.choices[0].text


def test_penalties_and_logit_bias(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count: one one one one"}]
    plain = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                           messages=messages)
    again = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                           messages=messages)
    assert plain.choices[0].message.content == again.choices[0].message.content
    penalized = client.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0, messages=messages, presence_penalty=2.0,
        frequency_penalty=2.0, extra_body={"repetition_penalty": 1.3, "min_p": 0.05})
    assert penalized.usage.completion_tokens > 0
    first_text = _first_token_text(client, messages)
    ids = _tokenizer().encode(first_text, add_special_tokens=False)
    assert len(ids) == 1
    banned = client.chat.completions.create(
        model=MODEL, max_tokens=3, temperature=0, messages=messages, logprobs=True,
        logit_bias={str(ids[0]): -100})
    assert banned.choices[0].logprobs.content[0].token != first_text


def _tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from shared.settings import Settings
    from worker.model_store import prepared_dir

    return AutoTokenizer.from_pretrained(prepared_dir(Settings()))


def _first_token_text(client: openai.OpenAI, messages: list[dict[str, str]]) -> str:
    done = client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0,
                                          messages=messages, logprobs=True)
    return done.choices[0].logprobs.content[0].token


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages: list[dict[str, object]] = [
        {"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0,
                                           messages=messages, tools=[WEATHER],
                                           tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "22 C and sunny"})
    final = client.chat.completions.create(model=MODEL, max_tokens=30, temperature=0,
                                           messages=messages, tools=[WEATHER])
    answer = final.choices[0].message
    assert answer.content or answer.tool_calls


def test_named_tool_call_streams_as_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=40, temperature=0, stream=True, tools=[WEATHER],
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    assert "city" in json.loads(calls[0]["arguments"])


def test_completion_echo(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                     echo=True)
    assert done.choices[0].text.startswith(prompt) and len(done.choices[0].text) > len(prompt)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                       temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == done.choices[0].text


def test_n_choices_whole_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a fruit."}]
    done = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=1.0, seed=5,
                                          n=3, messages=messages)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert all(c.message.content for c in done.choices)
    assert 3 <= done.usage.completion_tokens <= 24
    again = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=1.0, seed=5,
                                           n=3, messages=messages)
    assert [c.message.content for c in again.choices] == \
        [c.message.content for c in done.choices]
    stream = client.completions.create(model=MODEL, prompt="Apples are", max_tokens=6,
                                       temperature=1.0, seed=2, n=2, stream=True)
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1] and sorted(finished) == [0, 1]
