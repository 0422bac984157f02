"""Error types shared by gateway and worker. The gateway maps them to HTTP answers."""

from __future__ import annotations


class TokenfleetError(Exception):
    """Base of every error tokenfleet raises on purpose."""


class ProtocolError(TokenfleetError):
    """A message read from Redis is not a well-formed message of a known version."""


class InvalidRequestError(TokenfleetError):
    """The client sent something we cannot serve; the message says what to change (400)."""

    status_code = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ModelNotFoundError(InvalidRequestError):
    status_code = 404


class ConflictError(InvalidRequestError):
    """The request is valid but the resource's state does not allow it now (409), e.g.
    purging a job that has not finished."""

    status_code = 409


class IdempotencyKeyReusedError(InvalidRequestError):
    """An ``Idempotency-Key`` sent again with a different request (422)."""

    status_code = 422


class JobNotFoundError(TokenfleetError):
    """Unknown job id, or a job owned by another key (404 either way)."""


class AuthError(TokenfleetError):
    """Missing or invalid API key (401)."""


class RateLimitedError(TokenfleetError):
    """Too many requests or tokens for this key, or the queue is full (429)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class ServiceUnavailableError(TokenfleetError):
    """Redis unreachable, no worker for the model, or shutting down (503)."""


class ModelLoadError(TokenfleetError):
    """The model could not be found, prepared or loaded."""
