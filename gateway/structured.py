"""Structured outputs as the gateway checks them: ``response_format`` (``json_object``,
``json_schema``) and vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar``, turned into the worker's ``(guided_kind, guided_value)``.

Only the syntax is checked here (a JSON Schema against its metaschema, a regex by Python's
``re``), so a mistake is a 400 naming the problem; the grammar itself is compiled by the
worker (``worker.engine.grammar``), which the gateway never imports.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from gateway.schemas import GenerationParams
from shared.errors import InvalidRequestError

MAX_SPEC_CHARS = 100_000  # a schema, regex or grammar as sent to the worker
NO_GRAMMAR = ("", "")


def guided_spec(body: GenerationParams) -> tuple[str, str]:
    """``(kind, value)`` for the worker, ``("", "")`` when the request asks for none."""
    specs: list[tuple[str, tuple[str, str]]] = []
    fmt = body.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        specs.append(("response_format", _response_format(fmt)))
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            schema = _parse_json(schema, "guided_json")
        specs.append(("guided_json", ("json_schema", _schema_text(schema, "guided_json"))))
    if body.guided_regex is not None:
        specs.append(("guided_regex", ("regex", _regex(body.guided_regex))))
    if body.guided_choice is not None:
        specs.append(("guided_choice", ("choice", _choices(body.guided_choice))))
    if body.guided_grammar is not None:
        specs.append(("guided_grammar", ("grammar", _sized(body.guided_grammar,
                                                            "guided_grammar"))))
    if len(specs) > 1:
        names = ", ".join(name for name, _ in specs)
        raise InvalidRequestError(f"use only one of {names}: each constrains the output",
                                  param=specs[1][0])
    return specs[0][1] if specs else NO_GRAMMAR


def schema_spec(schema: Any, param: str) -> tuple[str, str]:
    """A JSON Schema (e.g. a tool's parameters) as a checked ``json_schema`` spec."""
    return "json_schema", _schema_text(schema, param)


def _response_format(fmt: dict[str, Any]) -> tuple[str, str]:
    kind = fmt.get("type")
    if kind == "json_object":
        return "json_object", ""
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}",
            param="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError(
            "response_format json_schema needs a json_schema object: "
            '{"name": ..., "schema": {...}, "strict": true}', param="response_format.json_schema")
    schema = spec.get("schema")
    if schema is None:
        raise InvalidRequestError("response_format.json_schema.schema is missing",
                                  param="response_format.json_schema.schema")
    return "json_schema", _schema_text(schema, "response_format.json_schema.schema")


def _schema_text(schema: Any, param: str) -> str:
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(f"{param} must be a JSON Schema object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidRequestError(f"{param} is not a valid JSON Schema at {where}: "
                                  f"{exc.message}", param=param) from None
    except Exception as exc:  # e.g. an unhashable $schema, or nesting past the recursion limit
        raise InvalidRequestError(f"{param} is not a valid JSON Schema: "
                                  f"{type(exc).__name__}: {exc}", param=param) from None
    return _sized(json.dumps(schema, separators=(",", ":")), param)


def _parse_json(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from None


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise InvalidRequestError(f"guided_regex is not a valid regular expression: {exc}",
                                  param="guided_regex") from None
    return _sized(pattern, "guided_regex")


def _choices(choices: list[str]) -> str:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError("guided_choice must be a non-empty list of non-empty strings",
                                  param="guided_choice")
    return _sized(json.dumps(choices), "guided_choice")


def _sized(text: str, param: str) -> str:
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidRequestError(f"{param} is {len(text)} characters; at most "
                                  f"{MAX_SPEC_CHARS} are allowed", param=param)
    return text
