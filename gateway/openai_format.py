"""OpenAI response bodies and stream chunks for chat completions and completions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.logprobs_format import chat_logprobs, completion_logprobs
from gateway.tools import ToolCallStream, parse_tool_calls
from shared.job_record import JobRecord

Kind = Literal["chat", "completion"]


@dataclass(slots=True)
class Choice:
    """One of several choices (n > 1) of a finished generation."""

    text: str
    finish_reason: str
    logprobs: list[list[Any]] | None = None


@dataclass(slots=True)
class Outcome:
    """A finished generation, as a non-streaming response reports it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[list[Any]] | None = None  # the tokens' entries when the request asked
    choices: list[Choice] | None = None  # n > 1: every choice, by index (0 is the above)

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(slots=True)
class OpenAIFormat:
    """Builds the bodies of one request: ``kind`` picks chat or text-completion shapes."""

    kind: Kind
    id: str
    model: str
    created: int
    include_usage: bool = False
    wants_logprobs: bool = False
    tool_mode: str = ""  # gateway.tools: MODE_HERMES / MODE_JSON parse tool calls; "" none
    echo: str = ""  # text completions with echo: the prompt, before the completion
    n: int = 1  # choices; n > 1 streams each choice's chunks and finish under its index
    _delta_parts: tuple[bytes, bytes] | None = field(default=None, init=False, repr=False,
                                                     compare=False)
    _offset: int = 0  # text completions: characters streamed so far (logprobs' text_offset)
    _tools: ToolCallStream | None = field(default=None, init=False, repr=False,
                                          compare=False)  # a stream's tool-call parser

    @classmethod
    def for_job(cls, job_id: str, fields: Mapping[bytes, bytes], *,
                include_usage: bool = False) -> OpenAIFormat:
        """The format of a stored job's answer (replays, job streams, batch lines)."""
        record = JobRecord.from_hash(fields)
        return cls(kind="chat" if record.kind == "chat" else "completion", id=job_id,
                   model=record.model or "", created=int(record.created_at or 0),
                   include_usage=include_usage, tool_mode=record.tool_mode or "",
                   echo=record.echo or "")

    def _logprobs(self, entries: list[list[Any]] | None) -> dict[str, Any] | None:
        if not self.wants_logprobs and not entries:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries or [])
        return completion_logprobs(entries or [], self._offset)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish_reason: str | None,
                logprobs: list[list[Any]] | None = None, index: int = 0) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs),
                    "finish_reason": finish_reason}
        choice = {"index": index, "text": text or "", "logprobs": self._logprobs(logprobs),
                  "finish_reason": finish_reason}
        self._offset += len(text or "")
        return choice

    def role_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role; completions have no such chunk, unless
        they echo the prompt (then it is their first chunk)."""
        if self.kind != "chat":
            return self.delta_chunk(self.echo) if self.echo else None
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None} for i in range(self.n)])

    def delta_chunk(self, text: str, logprobs: list[list[Any]] | None = None,
                    index: int = 0) -> dict[str, Any]:
        return self._chunk([self._choice(text, None, logprobs, index)])

    def delta_json(self, text: str) -> bytes:
        """``delta_chunk(text)`` without logprobs as compact JSON (``ensure_ascii=False``),
        byte for byte, from a template made once per request: a stream encodes only each
        token's text. Not for a request that wants logprobs."""
        assert not self.wants_logprobs
        if self.kind != "chat":
            self._offset += len(text)
        if self._delta_parts is None:
            whole = dumps(self.delta_chunk(""))
            marker = b'"content":""' if self.kind == "chat" else b'"text":""'
            at = whole.rindex(marker) + len(marker) - 2  # the id and model come before it
            self._delta_parts = (whole[:at], whole[at + 2:])
        prefix, suffix = self._delta_parts
        return prefix + dumps(text) + suffix

    def final_chunk(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        choice = self._choice(None, finish_reason, index=index)
        choice["logprobs"] = None
        return self._chunk([choice])

    # --- streams, with tool calls parsed out of the text when the request has tools --------
    def content_chunks(self, text: str,
                       logprobs: list[list[Any]] | None = None) -> list[dict[str, Any]]:
        """The chunks of one token event (none while text is held back)."""
        if not self.tool_mode or self.kind != "chat":
            return [self.delta_chunk(text, logprobs)]
        if self._tools is None:
            self._tools = ToolCallStream(self.tool_mode)
        chunks = self._tool_chunks(self._tools.feed(text))
        if logprobs:
            if chunks and "content" in chunks[0]["choices"][0]["delta"]:
                chunks[0]["choices"][0]["logprobs"] = self._logprobs(logprobs)
            else:
                chunks.insert(0, self.delta_chunk("", logprobs))
        return chunks

    def closing_chunks(self, finish_reason: str) -> list[dict[str, Any]]:
        """Held-back text or tool calls, then the chunk with the finish reason."""
        chunks: list[dict[str, Any]] = []
        if self._tools is not None:
            chunks = self._tool_chunks(self._tools.finish())
            if self._tools.num_calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        return [*chunks, self.final_chunk(finish_reason)]

    def _tool_chunks(self, parts: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        chunks = []
        for kind, value in parts:
            if kind == "content":
                chunks.append(self.delta_chunk(value))
                continue
            assert self._tools is not None
            call = {"index": self._tools.num_calls - 1, **value}
            chunks.append(self._chunk([{"index": 0, "delta": {"tool_calls": [call]},
                                        "logprobs": None, "finish_reason": None}]))
        return chunks

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage(prompt_tokens, completion_tokens)
        return chunk

    def response(self, outcome: Outcome) -> dict[str, Any]:
        choices = outcome.choices or [Choice(outcome.text, outcome.finish_reason,
                                             outcome.logprobs)]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [self._whole_choice(i, c) for i, c in enumerate(choices)],
                "usage": outcome.usage()}

    def _whole_choice(self, index: int, choice: Choice) -> dict[str, Any]:
        finish_reason = choice.finish_reason
        if self.kind != "chat":
            return {"index": index, "text": self.echo + choice.text,
                    "logprobs": self._logprobs(choice.logprobs), "finish_reason": finish_reason}
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if self.tool_mode:
            content, calls = parse_tool_calls(choice.text, self.tool_mode)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"index": index, "message": message, "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": finish_reason}


def dumps(obj: Any) -> bytes:
    """Compact JSON, non-ASCII kept as UTF-8: the encoding of every stream chunk."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
