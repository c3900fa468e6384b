"""Typed errors. Every failure a user can cause or observe has a class here.

Each carries an HTTP status (what the router answers with) and an OpenAI error ``type`` so the
router can turn any of them into OpenAI-style JSON without special cases.
"""
from __future__ import annotations


class LmdisaggError(Exception):
    """Base class. ``status`` is the HTTP status the router answers with."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


class InvalidRequestError(LmdisaggError):
    """The request itself is wrong (empty prompt, bad sampling parameters, wrong types)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt (plus max_tokens) does not fit the model's context."""

    status = 400


class PayloadTooLargeError(LmdisaggError):
    status = 413
    type = "invalid_request_error"


class ModelNotFoundError(LmdisaggError):
    """Unknown model name, or a path that holds no model."""

    status = 404
    type = "not_found_error"


class ModelCacheCorruptError(LmdisaggError):
    """A cached model directory exists but its files are missing or damaged."""

    status = 500
    type = "model_cache_error"


class OutOfBlocksError(LmdisaggError):
    """The KV block pool cannot hold the request even when empty."""

    status = 400
    type = "invalid_request_error"


class OverloadedError(LmdisaggError):
    """Too many requests queued; try again later."""

    status = 429
    type = "rate_limit_error"


class UnavailableError(LmdisaggError):
    """No worker can take the request right now (starting, shutting down, all dead)."""

    status = 503
    type = "service_unavailable"


class RequestAbortedError(LmdisaggError):
    status = 499
    type = "aborted"


class TimeoutError_(LmdisaggError):
    """A wait ran past its timeout (a transfer, a worker reply)."""

    status = 504
    type = "timeout"
