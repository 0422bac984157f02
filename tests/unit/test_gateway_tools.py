"""Tool calling in the gateway: tools/tool_choice checks and plans, the Hermes prompt for
templates without tool support, and tool calls parsed from whole and streamed answers."""

from __future__ import annotations

import json

import pytest

from gateway.openai_format import OpenAIFormat, Outcome
from gateway.tools import (
    MODE_HERMES,
    MODE_JSON,
    ToolCallStream,
    parse_tool_calls,
    plan_tools,
    with_tool_prompt,
)
from shared.errors import InvalidRequestError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}}}}


def test_plans_per_tool_choice() -> None:
    assert plan_tools(None, None).mode == ""
    auto = plan_tools([WEATHER], "auto")
    assert auto.mode == MODE_HERMES and auto.tools == [WEATHER] and auto.grammar == ("", "")
    assert plan_tools([WEATHER], None).mode == MODE_HERMES
    none = plan_tools([WEATHER], "none")
    assert none.mode == "" and none.tools == []
    required = plan_tools([WEATHER, TIME], "required")
    kind, value = required.grammar
    assert required.mode == MODE_JSON and kind == "json_schema"
    assert {c["properties"]["name"]["const"] for c in json.loads(value)["anyOf"]} == \
        {"get_weather", "get_time"}
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert json.loads(named.grammar[1])["properties"]["name"] == {"const": "get_time"}


@pytest.mark.parametrize(("tools", "choice", "param", "message"), [
    (None, "required", "tool_choice", "needs tools"),
    ([{"type": "retrieval"}], None, "tools[0]", "must be"),
    ([{"type": "function", "function": {}}], None, "tools[0].function", "needs a name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}], None,
     "tools[0].function.parameters", "not a valid JSON Schema"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice",
     "not in tools"),
    ([WEATHER], "sometimes", "tool_choice", "is not one of"),
])
def test_bad_tools_are_400s(tools: list[object] | None, choice: object, param: str,
                            message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        plan_tools(tools, choice)  # type: ignore[arg-type]
    assert info.value.param == param


def test_hermes_prompt_and_history_for_templates_without_tools() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22 C, sunny", "tool_call_id": "call_1"},
    ]
    out = with_tool_prompt(history, [WEATHER])
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"]
    assert "get_weather" in out[0]["content"]
    assert out[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": '
                                 '{"city": "Paris"}}\n</tool_call>')
    assert "tool_calls" not in out[2]
    assert out[3]["content"] == "<tool_response>\n22 C, sunny\n</tool_response>"
    assert history[1]["tool_calls"]  # the caller's messages are not changed


def test_parse_whole_answers() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
            '"Paris"}}\n</tool_call>')
    content, calls = parse_tool_calls(text, MODE_HERMES)
    assert content == "Let me check."
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert parse_tool_calls("just text", MODE_HERMES) == ("just text", [])
    assert parse_tool_calls("<tool_call>not json</tool_call>", MODE_HERMES)[1] == []
    content, calls = parse_tool_calls('{"name": "get_time", "arguments": {}}', MODE_JSON)
    assert content is None and calls[0]["function"]["arguments"] == "{}"


def test_streamed_answers_hold_back_partial_tags() -> None:
    stream = ToolCallStream(MODE_HERMES)
    pieces = ["Sure", ". <tool", '_call>{"name": "get_time",', ' "arguments": {}}</tool_',
              "call> done"]
    parts = [p for piece in pieces for p in stream.feed(piece)] + stream.finish()
    assert [k for k, _ in parts] == ["content", "content", "tool_call", "content"]
    assert "".join(v for k, v in parts if k == "content") == "Sure.  done"
    assert stream.num_calls == 1


def test_chat_format_with_tools_whole_and_streamed() -> None:
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    fmt = OpenAIFormat(kind="chat", id="c", model="m", created=0, tool_mode=MODE_HERMES)
    choice = fmt.response(Outcome(text, "stop", 5, 9))["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    streamed = OpenAIFormat(kind="chat", id="c", model="m", created=0, tool_mode=MODE_HERMES)
    chunks = streamed.content_chunks(text[:20]) + streamed.content_chunks(text[20:])
    chunks += streamed.closing_chunks("stop")
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert calls[0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = OpenAIFormat(kind="chat", id="c", model="m", created=0)
    assert plain.response(Outcome(text, "stop", 5, 9))["choices"][0]["message"]["content"] \
        == text


def test_a_tool_choice_with_an_odd_function_is_a_400() -> None:
    with pytest.raises(InvalidRequestError, match="tool_choice must be"):
        plan_tools([WEATHER], {"type": "function", "function": ["get_weather"]})
