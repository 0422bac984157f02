"""The wire protocol between gateway and workers: msgpack maps with a version field ``v``.

Messages:
- ``GenerateRequest``: gateway -> worker, one Redis Stream entry (field ``m``).
- ``TokenEvent``: worker -> gateway, published in batches (a msgpack list) on the gateway's
  channel and appended one by one to the job's event list.

Decoding is defensive: anything that is not a well-formed message of a known version raises
``ProtocolError`` (never ``KeyError``/``TypeError``), so a worker can dead-letter it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from shared.errors import ProtocolError

PROTOCOL_VERSION = 1

# Event types a TokenEvent may carry.
EVENT_START = "start"  # a worker took the request (status -> running)
EVENT_TOKEN = "token"  # new text / token ids
EVENT_DONE = "done"  # finished: finish_reason and usage are set
EVENT_ERROR = "error"  # failed: error is set; terminal
EVENT_RESTART = "restart"  # a new attempt starts from scratch: drop the text so far
EVENT_TYPES = frozenset({EVENT_START, EVENT_TOKEN, EVENT_DONE, EVENT_ERROR, EVENT_RESTART})
TERMINAL_EVENTS = frozenset({EVENT_DONE, EVENT_ERROR})

FINISH_REASONS = frozenset({"stop", "length", "cancelled", "error", "timeout"})


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop, per request."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    # OpenAI's penalties (-2..2) and vLLM's repetition penalty (> 0, 1 = off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: list[list[int | float]] = field(default_factory=list)  # [[token id, bias]]
    min_p: float = 0.0  # keep tokens with probability >= min_p x the top one's (0 = off)
    logprobs: int | None = None  # None: none; k: the sampled token's and the k most likely
    # structured outputs: "json_schema" (value: the schema as JSON), "json_object",
    # "regex", "choice" (value: a JSON list of strings), "grammar" (EBNF); "" = none
    guided_kind: str = ""
    guided_value: str = ""
    n: int = 1  # choices of one prompt (prefilled once)
    speculative: bool = True  # False: this request opts out of speculative decoding

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)


@dataclass(slots=True)
class GenerateRequest:
    """One generation request as it travels through the requests stream."""

    id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reply_channel: str = ""  # gateway channel for live events; "" -> nobody listens live
    lane: str = "interactive"
    owner: str = ""  # API key id that created it ("" when auth is off)
    created_at: float = 0.0  # unix seconds
    deadline: float | None = None  # unix seconds; past it the request is dropped unserved
    v: int = PROTOCOL_VERSION


@dataclass(slots=True)
class TokenEvent:
    """Something that happened to one request; ``seq`` orders a request's events."""

    id: str
    seq: int
    type: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # per token of ``token_ids``, when the request asked for logprobs:
    # [token text, logprob, [[text, logprob], ...] (the most likely first)]
    logprobs: list[list[Any]] = field(default_factory=list)
    index: int = 0  # the choice (n > 1); a token event with finish_reason ends that choice
    v: int = PROTOCOL_VERSION

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


# --- encoding -----------------------------------------------------------------------------


def _shallow(obj: Any) -> dict[str, Any]:
    """Fields as a dict without ``asdict``'s deep copy of every token-id list."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def pack(obj: GenerateRequest | TokenEvent) -> bytes:
    data = _shallow(obj)
    if isinstance(obj, GenerateRequest):
        data["params"] = _shallow(obj.params)
    return msgpack.packb(data, use_bin_type=True)


def pack_events(events: list[TokenEvent]) -> bytes:
    """A batch of events for one pub/sub message."""
    return msgpack.packb([_shallow(e) for e in events], use_bin_type=True)


def _unpack(data: bytes) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not valid msgpack: {exc}") from exc


def _check_version(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: unsupported protocol version {version!r}")
    return obj


def _get(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in obj:
        raise ProtocolError(f"{what}: missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProtocolError(f"{what}: field {name!r} must be {kind}, got bool")
    if not isinstance(value, kind):
        raise ProtocolError(f"{what}: field {name!r} has type {type(value).__name__}")
    return value


def _int_list(value: Any, name: str, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        raise ProtocolError(f"{what}: field {name!r} must be a list of integers")
    return value


def _params_from(obj: Any) -> SamplingParams:
    what = "SamplingParams"
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a map")
    num = (int, float)
    stop = _get(obj, "stop", list, what)
    if not all(isinstance(s, str) for s in stop):
        raise ProtocolError(f"{what}: stop must be a list of strings")
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ProtocolError(f"{what}: seed must be an integer or null")
    params = SamplingParams(
        max_tokens=_get(obj, "max_tokens", int, what),
        temperature=float(_get(obj, "temperature", num, what)),
        top_p=float(_get(obj, "top_p", num, what)),
        top_k=_get(obj, "top_k", int, what),
        seed=seed,
        stop=stop,
        stop_token_ids=_int_list(obj.get("stop_token_ids", []), "stop_token_ids", what),
        ignore_eos=bool(obj.get("ignore_eos", False)),
        min_tokens=_get(obj, "min_tokens", int, what) if "min_tokens" in obj else 0,
        presence_penalty=_optional_float(obj, "presence_penalty", 0.0, what),
        frequency_penalty=_optional_float(obj, "frequency_penalty", 0.0, what),
        repetition_penalty=_optional_float(obj, "repetition_penalty", 1.0, what),
        logit_bias=_bias_pairs(obj.get("logit_bias", []), what),
        min_p=_optional_float(obj, "min_p", 0.0, what),
        logprobs=_optional_int(obj, "logprobs", what),
        guided_kind=_get(obj, "guided_kind", str, what) if "guided_kind" in obj else "",
        guided_value=_get(obj, "guided_value", str, what) if "guided_value" in obj else "",
        n=_get(obj, "n", int, what) if "n" in obj else 1,
        speculative=bool(obj.get("speculative", True)),
    )
    if params.max_tokens < 1 or params.temperature < 0 or not 0 < params.top_p <= 1:
        raise ProtocolError(f"{what}: values out of range: {params}")
    if params.repetition_penalty <= 0 or not 0 <= params.min_p <= 1:
        raise ProtocolError(f"{what}: values out of range: {params}")
    if params.n < 1:
        raise ProtocolError(f"{what}: n must be >= 1")
    if params.logprobs is not None and params.logprobs < 0:
        raise ProtocolError(f"{what}: logprobs must be >= 0")
    return params


def _optional_float(obj: dict[str, Any], name: str, default: float, what: str) -> float:
    if name not in obj:
        return default
    return float(_get(obj, name, (int, float), what))


def _optional_int(obj: dict[str, Any], name: str, what: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    return int(_get(obj, name, int, what))


def _bias_pairs(value: Any, what: str) -> list[list[int | float]]:
    if not isinstance(value, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
        and not isinstance(pair[0], bool) and isinstance(pair[1], (int, float))
        and not isinstance(pair[1], bool) for pair in value
    ):
        raise ProtocolError(f"{what}: logit_bias must be a list of [token id, bias] pairs")
    return value


def unpack_request(data: bytes) -> GenerateRequest:
    what = "GenerateRequest"
    obj = _check_version(_unpack(data), what)
    deadline = obj.get("deadline")
    if deadline is not None and not isinstance(deadline, (int, float)):
        raise ProtocolError(f"{what}: deadline must be a number or null")
    prompt = _int_list(_get(obj, "prompt_token_ids", list, what), "prompt_token_ids", what)
    if not prompt:
        raise ProtocolError(f"{what}: empty prompt")
    return GenerateRequest(
        id=_get(obj, "id", str, what),
        model=_get(obj, "model", str, what),
        prompt_token_ids=prompt,
        params=_params_from(_get(obj, "params", dict, what)),
        reply_channel=_get(obj, "reply_channel", str, what),
        lane=_get(obj, "lane", str, what),
        owner=_get(obj, "owner", str, what),
        created_at=float(_get(obj, "created_at", (int, float), what)),
        deadline=None if deadline is None else float(deadline),
    )


def _event_from(obj: Any) -> TokenEvent:
    what = "TokenEvent"
    obj = _check_version(obj, what)
    kind = _get(obj, "type", str, what)
    if kind not in EVENT_TYPES:
        raise ProtocolError(f"{what}: unknown event type {kind!r}")
    finish = obj.get("finish_reason")
    error = obj.get("error")
    return TokenEvent(
        id=_get(obj, "id", str, what),
        seq=_get(obj, "seq", int, what),
        type=kind,
        text=_get(obj, "text", str, what),
        token_ids=_int_list(obj.get("token_ids", []), "token_ids", what),
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=_get(obj, "prompt_tokens", int, what),
        completion_tokens=_get(obj, "completion_tokens", int, what),
        error=error if isinstance(error, str) else None,
        logprobs=_logprob_entries(obj.get("logprobs", []), what),
        index=_get(obj, "index", int, what) if "index" in obj else 0,
    )


def _logprob_entries(value: Any, what: str) -> list[list[Any]]:
    if not isinstance(value, list) or not all(
        isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
        and isinstance(e[1], (int, float)) and isinstance(e[2], list) for e in value
    ):
        raise ProtocolError(f"{what}: logprobs must be [text, logprob, top] entries")
    return value


def unpack_event(data: bytes) -> TokenEvent:
    return _event_from(_unpack(data))


def unpack_events(data: bytes) -> list[TokenEvent]:
    obj = _unpack(data)
    if not isinstance(obj, list):
        raise ProtocolError("event batch: expected a list")
    return [_event_from(item) for item in obj]
