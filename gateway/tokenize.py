"""Prompt tokenization without torch: the model's ``tokenizer.json`` and its jinja2 chat template.

A ``PromptTokenizer`` is built once per model fingerprint (building parses the whole
tokenizer.json, which takes tens of milliseconds for a real model) and then only encodes.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from shared.errors import InvalidRequestError, TokenfleetError
from shared.model_info import ModelInfo


class ChatTemplateError(TokenfleetError):
    """The model's chat template itself is broken (a server-side problem: 500)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Hugging Face's variant: no HTML escaping, unicode kept as is.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


class PromptTokenizer:
    """Turns chat messages or a completion prompt into the model's token ids."""

    def __init__(self, info: ModelInfo) -> None:
        self.model = info.name
        self.fingerprint = info.fingerprint
        self._tokenizer = Tokenizer.from_str(info.tokenizer_json.decode("utf-8"))
        self._bos_token = info.bos_token
        self._eos_token = info.eos_token
        self._bos_id = self._tokenizer.token_to_id(info.bos_token) if info.bos_token else None
        self._add_bos = info.add_bos_token and self._bos_id is not None
        self._template = None
        self.knows_tools = "tools" in info.chat_template  # the template renders tools itself
        if info.chat_template:
            try:
                self._template = _template_env().from_string(info.chat_template)
            except TemplateError as exc:
                raise ChatTemplateError(
                    f"the chat template of model {info.name!r} does not compile: {exc}"
                ) from exc

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> str:
        if self._template is None:
            raise InvalidRequestError(
                f"model {self.model!r} has no chat template; use /v1/completions",
                param="messages",
            )
        try:
            extra = {"tools": tools} if tools else {}
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                **extra,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except TemplateError as exc:  # raise_exception() in the template: bad conversation
            raise InvalidRequestError(f"chat template rejected the messages: {exc}",
                                      param="messages") from exc

    def encode_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        # The template writes the special tokens itself (as Hugging Face does).
        return self._tokenizer.encode(self.render_chat(messages, tools),
                                      add_special_tokens=False).ids

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self._tokenizer.encode(prompt, add_special_tokens=False).ids
        if self._add_bos and self._bos_id is not None and ids[:1] != [self._bos_id]:
            ids.insert(0, self._bos_id)
        return ids
