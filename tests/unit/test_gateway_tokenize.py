"""Prompt tokenization from a ModelInfo: tokenizer.json + jinja2 chat template, no torch."""

from __future__ import annotations

import dataclasses

import pytest
from tokenizers import Tokenizer

from gateway.tokenize import ChatTemplateError, PromptTokenizer
from shared.errors import InvalidRequestError
from tests.support.model import tiny_model_info

INFO = tiny_model_info()
DECODER = Tokenizer.from_str(INFO.tokenizer_json.decode())


def decode(ids: list[int]) -> str:
    return DECODER.decode(ids, skip_special_tokens=False)


def test_chat_template_renders_with_generation_prompt() -> None:
    ids = PromptTokenizer(INFO).encode_chat([{"role": "user", "content": "héllo"}])
    assert decode(ids) == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == DECODER.token_to_id("<|im_start|>")  # special tokens stay single ids


def test_raise_exception_in_template_is_a_client_error() -> None:
    with pytest.raises(InvalidRequestError, match="must not start with an assistant"):
        PromptTokenizer(INFO).encode_chat([{"role": "assistant", "content": "x"}])


def test_model_without_template_rejects_chat() -> None:
    tokenizer = PromptTokenizer(dataclasses.replace(INFO, chat_template=""))
    assert not tokenizer.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tokenizer.encode_chat([{"role": "user", "content": "x"}])


def test_broken_template_is_a_server_error() -> None:
    with pytest.raises(ChatTemplateError):
        PromptTokenizer(dataclasses.replace(INFO, chat_template="{% for %}"))


def test_template_helpers() -> None:
    template = "{{ bos_token }}{{ messages | tojson }}{{ eos_token }}"
    tokenizer = PromptTokenizer(dataclasses.replace(INFO, chat_template=template))
    text = tokenizer.render_chat([{"role": "user", "content": "é<b>"}])
    assert text == '<|endoftext|>[{"role": "user", "content": "é<b>"}]<|im_end|>'


def test_completion_prompt_bos_only_when_asked() -> None:
    bos = DECODER.token_to_id("<|endoftext|>")
    assert PromptTokenizer(INFO).encode_prompt("ab") == DECODER.encode("ab").ids
    with_bos = PromptTokenizer(dataclasses.replace(INFO, add_bos_token=True))
    assert with_bos.encode_prompt("ab")[0] == bos
    assert with_bos.encode_prompt("<|endoftext|>ab").count(bos) == 1
