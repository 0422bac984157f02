"""Request bodies of the HTTP API: OpenAI's shapes plus a few extensions.

Only the shape and static ranges are checked here; limits that come from ``Settings`` or from
the model (stop sequences, context length, max_tokens) are checked in ``gateway.validate``.
Unknown fields are ignored, as OpenAI clients send many optional ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Lane = Literal["interactive", "batch"]

# Bounds of numbers that travel to the worker: msgpack carries int64/uint64 at most, and the
# engine indexes tensors with int32. Limits that depend on settings or the model are checked
# in ``gateway.validate``.
MAX_INT32 = 2**31 - 1
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range, which msgpack also carries
Role = Literal["system", "developer", "user", "assistant", "tool"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class GenerationParams(_Strict):
    """Fields shared by chat completions, completions and jobs."""

    model: str | None = Field(default=None, min_length=1,
                              description="optional when the fleet serves exactly one model")
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    # None = unset: the model's sampling defaults apply (``GET /v1/models``), else 1.0 / 1.0 / 0
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT32,
                              description="extension: 0 or -1 = off")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, description="extension")
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="extension")
    min_tokens: int = Field(default=0, ge=0, le=MAX_INT32, description="extension")
    speculative: bool = Field(default=True, description="extension: false opts this "
                              "request out of the worker's speculative decoding")
    n: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0,
                                             description="extension (vLLM): 1 = off")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="extension")
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None  # the deprecated form of tools
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = Field(default=None, description="extension")
    guided_regex: str | None = Field(default=None, description="extension")
    guided_choice: list[str] | None = Field(default=None, description="extension")
    guided_grammar: str | None = Field(default=None, description="extension (EBNF)")
    user: str | None = None
    lane: Lane | None = Field(default=None, description="extension: queue lane")
    priority: Lane | None = Field(default=None, description="extension: alias of lane")
    timeout: float | None = Field(default=None, gt=0, le=86_400,
                                  description="extension: seconds the request may wait in "
                                  "the queue before it is dropped unserved")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_lane(self) -> str:
        return self.lane or self.priority or "interactive"


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage]


class CompletionRequest(GenerationParams):
    prompt: str | list[Any]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class JobRequest(GenerationParams):
    """``POST /v1/jobs``: a chat body (``messages``) or a completion body (``prompt``)."""

    messages: list[ChatMessage] | None = None
    prompt: str | list[Any] | None = None
    webhook: str | None = Field(default=None, description="URL to POST the job to when it "
                                "starts or completes (http or https)")
    webhook_events_filter: list[str] | None = Field(
        default=None, description='events sent to the webhook: "start", "completed" '
        '(default ["completed"])')
