"""Typed provider errors: each one says what the router should do next.

- ``RetryableError``: the tier may answer if asked again (5xx, connect error, timeout,
  429). Retry with backoff inside the request deadline, then fail over.
- ``CapacityError``: the tier is full right now (local queue full, GPU out of memory).
  Fail over at once, without retrying the same tier.
- ``FatalError``: the client caused it (bad parameters, a prompt too long). Do not fail
  over; hand the status and body to the client as they are.
"""

from __future__ import annotations

from typing import Any


class ProviderError(Exception):
    """Base of every error a provider raises on purpose."""

    def __init__(self, message: str, *, tier: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.tier = tier
        self.status = status


class RetryableError(ProviderError):
    """Transient: retry with backoff, then fail over. ``retry_after`` is honoured when set."""

    def __init__(
        self,
        message: str,
        *,
        tier: str = "",
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, tier=tier, status=status)
        self.retry_after = retry_after


class CapacityError(ProviderError):
    """The tier cannot take this request now: fail over at once."""


class FatalError(ProviderError):
    """The client's request is at fault: return it to the client, do not fail over.

    ``body`` is the OpenAI-style error body to send (an upstream's own body when it came
    from one); ``status`` the HTTP status to send with it.
    """

    def __init__(
        self,
        message: str,
        *,
        tier: str = "",
        status: int = 400,
        body: dict[str, Any] | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, tier=tier, status=status)
        self.code = code
        self.param = param
        self.body = body or error_body(message, status=status, code=code, param=param)


def error_type_for(status: int) -> str:
    """The OpenAI ``error.type`` conventionally used with an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    message: str,
    *,
    status: int = 400,
    code: str | None = None,
    param: str | None = None,
    type_: str | None = None,
) -> dict[str, Any]:
    """An OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": message,
            "type": type_ or error_type_for(status),
            "param": param,
            "code": code,
        }
    }
