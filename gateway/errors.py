"""Every error the gateway answers with, and the one place that maps them to HTTP.

Bodies follow OpenAI: ``{"error": {"message", "type", "param", "code"}}``. No handler ever
puts a traceback in a response; unexpected exceptions are logged and answered with a 500.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import (
    AuthError,
    InvalidRequestError,
    JobNotFoundError,
    ModelLoadError,
    ProtocolError,
    RateLimitedError,
    ServiceUnavailableError,
    TokenfleetError,
)

logger = logging.getLogger("tokenfleet.gateway")


class GatewayTimeoutError(TokenfleetError):
    """A non-streaming request did not finish in time (504)."""


class GenerationFailedError(TokenfleetError):
    """The worker reported an error for the request (500)."""


# (type, HTTP status, OpenAI error type, code); the first matching row wins.
_ERROR_TABLE: tuple[tuple[type[Exception], int, str, str | None], ...] = (
    (AuthError, 401, "authentication_error", "invalid_api_key"),
    (JobNotFoundError, 404, "invalid_request_error", "job_not_found"),
    (RateLimitedError, 429, "rate_limit_error", "rate_limited"),
    (ServiceUnavailableError, 503, "service_unavailable", "unavailable"),
    (GatewayTimeoutError, 504, "timeout_error", "timeout"),
    (GenerationFailedError, 500, "server_error", "generation_failed"),
    (ProtocolError, 502, "server_error", "bad_worker_data"),
    (ModelLoadError, 503, "service_unavailable", "model_unavailable"),
    (TokenfleetError, 500, "server_error", None),
)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(message, kind=kind, param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


def describe(exc: TokenfleetError) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for one of our errors (also used mid-stream)."""
    if isinstance(exc, InvalidRequestError):
        code = exc.code or ("model_not_found" if exc.status_code == 404 else None)
        return exc.status_code, error_body(exc.message, param=exc.param, code=code)
    for exc_type, status, kind, code in _ERROR_TABLE:
        if isinstance(exc, exc_type):
            return status, error_body(str(exc) or kind, kind=kind, code=code)
    raise AssertionError("unreachable: TokenfleetError is in the table")


async def _tokenfleet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TokenfleetError)
    status, body = describe(exc)
    headers = {}
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
    return JSONResponse(body, status_code=status, headers=headers)


REDIS_RETRY_AFTER_S = 5  # Retry-After of a 503 caused by Redis
REDIS_LOG_EVERY_S = 30.0  # one log line per kind of Redis trouble per this period

# Replies of a live Redis that refuses writes for a while: (marker, code, what to tell).
_REDIS_REFUSALS: tuple[tuple[str, str, str], ...] = (
    ("OOM", "redis_out_of_memory",
     "Redis is out of memory (maxmemory reached) and refuses writes"),
    ("READONLY", "redis_read_only",
     "Redis is read-only (a failover to a replica may be under way) and refuses writes"),
    ("MISCONF", "redis_misconfigured",
     "Redis refuses writes because it cannot persist to disk (MISCONF)"),
)
_last_logged: dict[str, float] = {}
_WORD = re.compile(r"[A-Z]+")


def redis_refusal(exc: RedisError) -> tuple[str, str] | None:
    """``(code, message)`` when ``exc`` is a write refusal of a live Redis (not an outage).

    redis-py types OOM and READONLY replies; MISCONF, and any of them inside a Lua script's
    error, arrive as a plain ``ResponseError`` whose text names the reply."""
    words = set(_WORD.findall(str(exc)))
    for marker, code, message in _REDIS_REFUSALS:
        is_typed = (marker == "OOM" and isinstance(exc, RedisOutOfMemoryError)) or (
            marker == "READONLY" and isinstance(exc, RedisReadOnlyError))
        if is_typed or marker in words:
            return code, message
    return None


def _log_redis_trouble(code: str, line: str) -> None:
    """One warning per kind of trouble per ``REDIS_LOG_EVERY_S``, not one per request."""
    now = time.monotonic()
    if now - _last_logged.get(code, float("-inf")) >= REDIS_LOG_EVERY_S:
        _last_logged[code] = now
        logger.warning("%s (answering 503 with Retry-After; logged once per %.0f s)",
                       line, REDIS_LOG_EVERY_S)


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RedisError)
    headers = {"Retry-After": str(REDIS_RETRY_AFTER_S)}
    refusal = redis_refusal(exc)
    if refusal is not None:
        code, what = refusal
        _log_redis_trouble(code, f"{what}: {exc}")
        return error_response(503, f"{what}; the request was not queued, retry later",
                              kind="service_unavailable", code=code, headers=headers)
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        _log_redis_trouble("redis_unavailable", f"Redis unavailable: {exc!r}")
        return error_response(503, f"Redis unavailable: {exc}", kind="service_unavailable",
                              code="redis_unavailable", headers=headers)
    logger.warning("%s %s: Redis error: %r", request.method, request.url.path, exc)
    return error_response(503, f"Redis error: {exc}", kind="service_unavailable",
                          code="redis_error", headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    """``("body", "messages", 0, "content", "str")`` -> ``messages[0].content``."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and (not item.isidentifier() or item in _UNION_TAGS):
            continue  # pydantic names the union member it tried: not a field
        else:
            parts.append(f".{item}" if parts else str(item))
    return "".join(parts)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable sentence (and the first bad field) from pydantic's error list."""
    if any(err.get("type") == "json_invalid" for err in errors):
        return "request body is not valid JSON", None
    by_field: dict[str, list[str]] = {}
    for err in errors:
        loc = tuple(err.get("loc", ()))
        path = _field_path(loc)
        if not path and isinstance(err.get("input"), (bytes, str)):
            by_field.setdefault("", []).append("request body must be a JSON object")
            continue
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "missing":
            msg = "this field is required"
        messages = by_field.setdefault(path, [])
        if msg not in messages:
            messages.append(msg)
    parts = [f"{path}: {' or '.join(msgs)}" if path else " or ".join(msgs)
             for path, msgs in by_field.items()]
    first = next(iter(by_field), None)
    return "invalid request: " + "; ".join(parts), first or None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(list(exc.errors()))
    return error_response(400, message, param=param)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = "not_found" if exc.status_code == 404 else None
    return error_response(exc.status_code, str(exc.detail), kind=kind, code=code,
                          headers=dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(500, "internal server error", kind="server_error",
                          code="internal_error")


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TokenfleetError, _tokenfleet_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


# --- added by the streams work (self-contained: keep below the table above) -------------


class QueueTimeoutError(TokenfleetError):
    """The request waited in the queue past its own ``timeout`` (504 ``queue_timeout``).

    Not a server fault: the client asked for the bound. Retry later, with a longer
    ``timeout``, or as a job (``POST /v1/jobs``)."""


QUEUE_TIMEOUT_ROW: tuple[type[Exception], int, str, str | None] = (
    QueueTimeoutError, 504, "timeout_error", "queue_timeout")
_ERROR_TABLE = (QUEUE_TIMEOUT_ROW, *_ERROR_TABLE)
