"""Structured outputs on the tiny model: whatever a random model would say, the grammar
makes every answer parse and validate; rows without a grammar are untouched; a schema the
grammar engine refuses fails only its own request, with a message naming the problem."""

from __future__ import annotations

import json
import string

import jsonschema
import pytest
import torch

from shared.protocol import SamplingParams
from tests.unit.tiny_model import EOS, VOCAB, tiny_llama
from worker.engine.engine import EngineConfig, LLMEngine
from worker.engine.model_runner import TransformerRunner
from worker.engine.types import EngineRequest, RequestOutput

pytest.importorskip("xgrammar")
from worker.engine.grammar import GrammarBackend

_CHARS = list(string.digits + string.ascii_letters + ' {}[]":,.-_')
_CHARS += [c for c in string.punctuation if c not in _CHARS][:VOCAB - 3 - len(_CHARS)]
TOKENS = ["", "", "", *_CHARS]  # 0-2 special, then one character per token


class Decoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(TOKENS[i] for i in ids)


SCHEMAS: list[dict[str, object]] = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog"]}},
     "required": ["name", "age", "kind"]},
    {"type": "object", "properties": {
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "inner": {"type": "object", "properties": {"z": {"type": "null"},
                                                   "w": {"type": "integer"}},
                  "required": ["z"]}},
     "required": ["flags", "inner"]},
    {"type": "object", "properties": {
        "score": {"type": "number", "minimum": -5, "maximum": 5},
        "note": {"type": "string", "maxLength": 3}},
     "required": ["score"]},  # "note" optional
    {"type": "array", "items": {"enum": [1, 2, "three"]}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"k": {"type": "string", "maxLength": 2}},
        "required": ["k"]}}}, "required": ["tags"]},
]


def _engine() -> LLMEngine:
    backend = GrammarBackend.from_vocab(TOKENS, [EOS])
    return LLMEngine(TransformerRunner(tiny_llama(torch.float32)), Decoder(),
                     EngineConfig(eos_token_ids=(EOS,)), grammars=backend)


def _run(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.id, []).append(out)
    return outs


def _text(outs: list[RequestOutput]) -> str:
    return "".join(o.text_delta for o in outs)


def test_every_answer_parses_and_validates_against_its_schema() -> None:
    engine = _engine()
    for k, schema in enumerate(SCHEMAS):
        for seed in range(3):
            engine.add_request(EngineRequest(f"s{k}-{seed}", [1, 5, 9], SamplingParams(
                max_tokens=200, temperature=1.0, seed=seed, guided_kind="json_schema",
                guided_value=json.dumps(schema))))
    engine.add_request(EngineRequest("object", [1, 5, 9], SamplingParams(
        max_tokens=200, temperature=0.0, guided_kind="json_object")))
    outs = _run(engine)
    for k, schema in enumerate(SCHEMAS):
        for seed in range(3):
            got = outs[f"s{k}-{seed}"]
            assert got[-1].finish_reason == "stop", got[-1]
            jsonschema.validate(json.loads(_text(got)), schema)
    if outs["object"][-1].finish_reason == "stop":  # greedy on a random model may run long
        assert isinstance(json.loads(_text(outs["object"])), dict)


def test_regex_and_choice() -> None:
    engine = _engine()
    engine.add_request(EngineRequest("re", [1, 5, 9], SamplingParams(
        max_tokens=40, temperature=1.0, seed=2, guided_kind="regex",
        guided_value=r"[0-9]{3}-[a-c]{1,4}")))
    engine.add_request(EngineRequest("choice", [1, 5, 9], SamplingParams(
        max_tokens=40, temperature=1.0, seed=3, guided_kind="choice",
        guided_value=json.dumps(["yes", "no way"]))))
    outs = _run(engine)
    import re
    assert re.fullmatch(r"[0-9]{3}-[a-c]{1,4}", _text(outs["re"]))
    assert _text(outs["choice"]) in ("yes", "no way")


def test_rows_without_a_grammar_are_unchanged_by_a_guided_neighbour() -> None:
    plain = SamplingParams(max_tokens=8, temperature=0.8, seed=4, ignore_eos=True)
    alone = _engine()
    alone.add_request(EngineRequest("p", [1, 4, 9, 16], plain))
    mixed = _engine()
    mixed.add_request(EngineRequest("p", [1, 4, 9, 16], plain))
    mixed.add_request(EngineRequest("g", [1, 4, 9, 17], SamplingParams(
        max_tokens=30, temperature=1.0, seed=1, guided_kind="json_schema",
        guided_value=json.dumps(SCHEMAS[0]))))
    assert _text(_run(mixed)["p"]) == _text(_run(alone)["p"])


def test_a_schema_that_does_not_compile_fails_only_its_request() -> None:
    engine = _engine()
    engine.add_request(EngineRequest("bad", [1, 5], SamplingParams(
        max_tokens=5, guided_kind="json_schema", guided_value='{"type": "nonsense"}')))
    engine.add_request(EngineRequest("ok", [1, 5], SamplingParams(max_tokens=3,
                                                                  ignore_eos=True)))
    outs = _run(engine)
    assert outs["bad"][-1].finish_reason == "error"
    assert "json_schema cannot be compiled" in (outs["bad"][-1].error or "")
    assert outs["ok"][-1].finish_reason == "length"


def test_without_a_backend_a_guided_request_fails_with_a_message() -> None:
    engine = LLMEngine(TransformerRunner(tiny_llama(torch.float32)), Decoder(),
                       EngineConfig(eos_token_ids=(EOS,)))
    engine.add_request(EngineRequest("g", [1, 5], SamplingParams(
        max_tokens=5, guided_kind="json_object")))
    out = _run(engine)["g"][-1]
    assert out.finish_reason == "error" and "xgrammar" in (out.error or "")


def test_a_schema_is_compiled_once() -> None:
    backend = GrammarBackend.from_vocab(TOKENS, [EOS])
    spec = json.dumps(SCHEMAS[1])
    first = backend.compile("json_schema", spec)
    assert backend.compile("json_schema", spec) is first
    assert backend.compile("json_schema", json.dumps(SCHEMAS[0])) is not first
