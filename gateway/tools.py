"""Tool calling: the prompt side (tools into the chat template) and the answer side (the
model's text parsed into OpenAI ``tool_calls``, whole or streamed as deltas).

The model's own template renders ``tools`` when it knows them; a template that never
mentions tools (SmolLM2's) gets them in a system message in the Hermes format that
Qwen2.5 and Hermes models use natively: the model answers ``<tool_call>{"name": ...,
"arguments": {...}}</tool_call>``. With ``tool_choice`` ``required`` or a named function
the answer is one bare JSON call ``{"name": ..., "arguments": {...}}`` forced by a
grammar (``tool_grammar``), so it always parses.

Modes (stored with the job, so replays, job results and batch lines parse alike):
``hermes`` parses ``<tool_call>`` blocks out of free text; ``json`` reads the whole text as
one call.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from gateway.structured import schema_spec
from shared.errors import InvalidRequestError

MODE_HERMES = "hermes"
MODE_JSON = "json"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128

_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user "
    "query. Don't make assumptions about what values to plug into functions. Here are the "
    "available tools: <tools>\n{tools}\n</tools>\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(slots=True)
class ToolPlan:
    """What a request's ``tools`` / ``tool_choice`` mean for its prompt and its answer."""

    tools: list[dict[str, Any]] = field(default_factory=list)  # for the template ([] = none)
    mode: str = ""  # "" (no parsing), MODE_HERMES or MODE_JSON
    grammar: tuple[str, str] = ("", "")  # (guided_kind, guided_value) when forced


def plan_tools(tools: list[Any] | None, tool_choice: str | dict[str, Any] | None) -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` (400s name the problem) and plan the request."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}",
                                  param="tools")
    functions = [_function(tool, i) for i, tool in enumerate(tools)]
    names = [f["name"] for f in functions]
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan(tools=list(tools), mode=MODE_HERMES)
    if tool_choice == "none":
        return ToolPlan()
    if tool_choice == "required":
        return ToolPlan(tools=list(tools), mode=MODE_JSON, grammar=tool_grammar(functions))
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequestError(
                'tool_choice must be "none", "auto", "required" or {"type": "function", '
                '"function": {"name": ...}}', param="tool_choice")
        if name not in names:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools "
                                      f"({', '.join(names)})", param="tool_choice")
        chosen = [f for f in functions if f["name"] == name]
        return ToolPlan(tools=list(tools), mode=MODE_JSON, grammar=tool_grammar(chosen))
    raise InvalidRequestError(f"tool_choice {tool_choice!r} is not one of none, auto, "
                              "required or a named function", param="tool_choice")


def _function(tool: Any, i: int) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise InvalidRequestError(f'{param} must be {{"type": "function", "function": {{...}}}}',
                                  param=param)
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
            or not function["name"]:
        raise InvalidRequestError(f"{param}.function needs a name", param=f"{param}.function")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    schema_spec(parameters, f"{param}.function.parameters")  # a 400 if it is no schema
    return {"name": function["name"], "parameters": parameters}


def tool_grammar(functions: list[dict[str, Any]]) -> tuple[str, str]:
    """One call ``{"name": ..., "arguments": {...}}`` to one of ``functions``."""
    calls = [{"type": "object", "properties": {
        "name": {"const": f["name"]}, "arguments": f["parameters"]},
        "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return schema_spec(schema, "tools")


def template_needs_help(template_source: str) -> bool:
    """True when the chat template never renders ``tools`` itself."""
    return "tools" not in template_source


def with_tool_prompt(messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with the Hermes tool instructions in the system message, and earlier tool
    calls written back as ``<tool_call>`` text (for templates without tool support)."""
    prompt = _SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return [_as_text(m) for m in out]


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.pop("tool_calls", None)
    if calls:
        blocks = [f"{OPEN}\n" + json.dumps({
            "name": c["function"]["name"],
            "arguments": _arguments_object(c["function"].get("arguments"))}) + f"\n{CLOSE}"
            for c in calls]
        message["content"] = "\n".join([message.get("content") or "", *blocks]).strip()
    if message["role"] == "tool":
        message["content"] = f"<tool_response>\n{message['content']}\n</tool_response>"
    message.pop("tool_call_id", None)
    return message


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


# --- the answer -----------------------------------------------------------------------------


def _call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": obj["name"],
                         "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments)}}


def _parse_call(text: str) -> dict[str, Any] | None:
    try:
        return _call(json.loads(text))
    except ValueError:
        return None


def parse_tool_calls(text: str, mode: str) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a whole answer; the text itself when nothing parses."""
    if mode == MODE_JSON:
        call = _parse_call(text)
        return (None, [call]) if call else (text, [])
    if mode != MODE_HERMES or OPEN not in text:
        return text, []
    stream = ToolCallStream(mode)
    parts = stream.feed(text) + stream.finish()
    content = "".join(v for k, v in parts if k == "content").strip()
    calls = [v for k, v in parts if k == "tool_call"]
    if not calls:
        return text, []
    return content or None, calls


class ToolCallStream:
    """Splits a streamed answer into content deltas and whole tool calls, holding back text
    that may be the start of a ``<tool_call>`` tag."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.buffer = ""
        self.num_calls = 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buffer += text
        if self.mode == MODE_JSON:
            return []  # the whole answer is one call: parsed at the end
        out: list[tuple[str, Any]] = []
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = _partial_tag(self.buffer)
                if len(self.buffer) > keep:
                    out.append(("content", self.buffer[:len(self.buffer) - keep]))
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                return out
            if start:
                out.append(("content", self.buffer[:start]))
                self.buffer = self.buffer[start:]
            end = self.buffer.find(CLOSE)
            if end < 0:
                return out
            out.extend(self._block(self.buffer[len(OPEN):end]))
            self.buffer = self.buffer[end + len(CLOSE):]

    def finish(self) -> list[tuple[str, Any]]:
        rest, self.buffer = self.buffer, ""
        if self.mode == MODE_JSON:
            call = _parse_call(rest)
            if call:
                self.num_calls += 1
                return [("tool_call", call)]
            return [("content", rest)] if rest else []
        if rest.startswith(OPEN):  # an unclosed block at the end (e.g. EOS before the tag)
            parsed = self._block(rest[len(OPEN):])
            if parsed and parsed[0][0] == "tool_call":
                return parsed
        return [("content", rest)] if rest else []

    def _block(self, inner: str) -> list[tuple[str, Any]]:
        call = _parse_call(inner.strip())
        if call is None:
            return [("content", f"{OPEN}{inner}{CLOSE}")]
        self.num_calls += 1
        return [("tool_call", call)]


def _partial_tag(text: str) -> int:
    """How many characters at the end of ``text`` could begin ``<tool_call>``."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
