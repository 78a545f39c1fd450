"""The access log: one structured line per request, written after the response.

aiohttp calls ``AccessLogger.log`` once the response (a whole stream included) has been
sent, so the line never delays the client. Off a TTY the line is rendered by a short
structlog pipeline to JSON bytes into a buffer that is flushed every ``flush_s`` (and at
shutdown): one write per batch of lines rather than one per request, the way nginx's
``access_log ... buffer=`` works. On a TTY it goes through the ordinary logger.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from gateway.logging import isatty, scrub_text

FLUSH_S = 0.05

# What the edge and the handlers note on each request, for its access line.
REQUEST_ID = web.RequestKey("tiergate_request_id", str)
KEY = web.RequestKey("tiergate_key", object)
TIER = web.RequestKey("tiergate_tier", str)
ATTEMPTS = web.RequestKey("tiergate_attempts", int)
USAGE = web.RequestKey("tiergate_usage", object)


class _BufferedLines:
    """A structlog logger that appends rendered lines to a byte stream and flushes it
    on a short timer instead of after every line."""

    def __init__(self, stream: Any, flush_s: float) -> None:
        self._stream = stream
        self._flush_s = flush_s
        self._scheduled: asyncio.TimerHandle | None = None

    def msg(self, line: bytes) -> None:
        self._stream.write(line + b"\n")
        if self._scheduled is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = loop.call_later(self._flush_s, self.flush)

    info = warning = error = critical = debug = msg

    def flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a closed or broken log stream
            print(f"access log flush failed: {exc!r}", file=sys.stderr)


def _scrub_client_text(
    _logger: Any, _method: str, event_dict: dict[str, Any]
) -> dict[str, Any]:
    """The fields are the server's own; only client-chosen text (request id, path)
    could carry a secret."""
    for k in ("request_id", "path"):
        v = event_dict.get(k)
        if v:
            event_dict[k] = scrub_text(v)
    return event_dict


class AccessLog:
    """Owned by the runtime: renders and buffers the access lines."""

    def __init__(self, level: str = "info", fmt: str = "auto", stream: Any = None,
                 flush_s: float = FLUSH_S) -> None:
        stream = stream or sys.stderr
        as_json = fmt == "json" or (fmt == "auto" and not isatty(stream))
        raw = getattr(stream, "buffer", None)
        self._lines: _BufferedLines | None = None
        if not as_json or raw is None:
            self.logger: Any = structlog.get_logger("gateway.access")
            return
        self._lines = _BufferedLines(raw, flush_s)
        self.logger = structlog.wrap_logger(
            self._lines,
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _scrub_client_text,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(
                getattr(logging, level.upper(), logging.INFO)
            ),
            cache_logger_on_first_use=True,
        )

    def request(self, request: BaseRequest, response: StreamResponse, seconds: float) -> None:
        usage = request.get(USAGE)
        key = request.get(KEY)
        self.logger.info(
            "request",
            request_id=request.get(REQUEST_ID),
            method=request.method,
            path=request.path,
            status=response.status,
            tier=request.get(TIER),
            attempts=request.get(ATTEMPTS),
            latency_ms=round(seconds * 1000, 2),
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            key=key.name if key else None,
        )

    def flush(self) -> None:
        if self._lines is not None:
            self._lines.flush()


ACCESS_LOG = web.AppKey("tiergate_access_log", AccessLog)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's hook, called after each response; hands over to the app's AccessLog."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        app = getattr(request, "app", None)  # absent for a request aiohttp could not parse
        access = app.get(ACCESS_LOG) if app is not None else None
        if access is not None:
            access.request(request, response, time)
