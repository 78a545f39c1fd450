"""HTTP error responses in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from aiohttp import web

from gateway.wire import dumps
from providers.errors import error_body


class ApiError(Exception):
    """Raise from a handler or middleware to answer with an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = error_body(self.message, status=self.status, code=self.code, param=self.param,
                          type_=self.type)
        return json_response(body, status=self.status, headers=self.headers)


def json_response(body: object, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=dumps(body), status=status, headers=headers, content_type="application/json"
    )
