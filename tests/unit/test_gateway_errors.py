"""Error bodies: pydantic errors as one readable sentence, error types as statuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from gateway.errors import GatewayTimeoutError, describe, redis_refusal, validation_message
from gateway.schemas import ChatCompletionRequest
from shared.errors import (
    AuthError,
    InvalidRequestError,
    JobNotFoundError,
    ModelNotFoundError,
    RateLimitedError,
    ServiceUnavailableError,
)


def errors_of(body: object) -> list[dict[str, object]]:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    return [{**err, "loc": ("body", *err["loc"])} for err in info.value.errors()]


def test_field_errors_name_the_field() -> None:
    message, param = validation_message(errors_of({"model": "m", "messages": [
        {"role": "user", "content": 5}]}))
    assert message == ("invalid request: messages[0].content: Input should be a valid string "
                       "or Input should be a valid list")
    assert param == "messages[0].content"


def test_missing_and_range_errors() -> None:
    message, param = validation_message(errors_of({"model": "m", "temperature": 9}))
    assert "messages: this field is required" in message
    assert "temperature: Input should be less than or equal to 2" in message
    assert param == "temperature"  # the first error in field order


def test_json_and_body_type_errors() -> None:
    assert validation_message([{"type": "json_invalid", "loc": ("body", 3), "msg": "x"}]) == (
        "request body is not valid JSON", None)
    message, _ = validation_message([{"type": "model_attributes_type", "loc": ("body",),
                                      "msg": "Input should be an object", "input": b"x"}])
    assert message == "invalid request: request body must be a JSON object"


@pytest.mark.parametrize(("error", "status", "code"), [
    (InvalidRequestError("bad", param="x"), 400, None),
    (ModelNotFoundError("nope", param="model"), 404, "model_not_found"),
    (JobNotFoundError("no job"), 404, "job_not_found"),
    (AuthError("who"), 401, "invalid_api_key"),
    (RateLimitedError("slow down", retry_after_s=3), 429, "rate_limited"),
    (ServiceUnavailableError("down"), 503, "unavailable"),
    (GatewayTimeoutError("late"), 504, "timeout"),
])
def test_describe_maps_error_types(error: Exception, status: int, code: str | None) -> None:
    got_status, body = describe(error)  # type: ignore[arg-type]
    assert got_status == status
    assert body["error"]["code"] == code
    assert body["error"]["message"] == str(error)


@pytest.mark.parametrize(("error", "code"), [
    (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
     "redis_out_of_memory"),
    (ReadOnlyError("You can't write against a read only replica."), "redis_read_only"),
    (ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently "
                   "unable to persist to disk."), "redis_misconfigured"),
    (ResponseError("Error running script (call to f_1): @user_script:2: OOM command not "
                   "allowed when used memory > 'maxmemory'."), "redis_out_of_memory"),
    (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), None),
    (RedisConnectionError("Connection refused"), None),
])
def test_write_refusals_of_a_live_redis_are_recognized(error: Exception,
                                                       code: str | None) -> None:
    refusal = redis_refusal(error)  # type: ignore[arg-type]
    assert (refusal[0] if refusal else None) == code
