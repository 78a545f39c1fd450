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
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from gateway.logging import isatty, scrub_text

FLUSH_S = 0.05
CLIENT_CLOSED = 499



@dataclass(slots=True)
class Note:
    """What the edge and the handlers note about one request, for its access line."""

    request_id: str
    client_chose_id: bool = False  # the id came from the client's x-request-id
    key: Any = None  # tracking.ApiKey
    tier: str | None = None
    attempts: int | None = None
    usage: Any = None  # providers.schemas.Usage
    # The client left before the answer was complete: logged as 499, nginx's "client
    # closed request", whatever status line had already gone out.
    client_gone: bool = False


# Fast path: docs/BENCHMARKS.md "buffered access line" (this buffer, _Clock, the direct renderer).
class _BufferedLines:
    """Collects rendered lines and writes them to a byte stream as one write per batch:
    every ``flush_s`` (and at shutdown), or at once when ``MAX_PENDING_LINES`` pile up."""

    MAX_PENDING_LINES = 2048

    def __init__(self, stream: Any, flush_s: float) -> None:
        self._stream = stream
        self._flush_s = flush_s
        self._pending: list[bytes] = []
        self._scheduled: asyncio.TimerHandle | None = None

    def msg(self, line: bytes) -> None:
        pending = self._pending
        pending.append(line)
        if len(pending) >= self.MAX_PENDING_LINES:
            self.flush()
        elif self._scheduled is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = loop.call_later(self._flush_s, self.flush)

    def flush(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write(b"\n".join(lines) + b"\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a closed or broken log stream
            print(f"access log write failed, {len(lines)} lines lost: {exc!r}", file=sys.stderr)


class _Clock:
    """ISO-8601 UTC timestamps like structlog's TimeStamper, the date-time part
    formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return "%s.%06dZ" % (self._prefix, (t - second) * 1_000_000)  # %d truncates


class AccessLog:
    """Owned by the runtime: renders and buffers the access lines."""

    def __init__(self, level: str = "info", fmt: str = "auto", stream: Any = None,
                 flush_s: float = FLUSH_S) -> None:
        stream = stream or sys.stderr
        as_json = fmt == "json" or (fmt == "auto" and not isatty(stream))
        raw = getattr(stream, "buffer", None)
        self._enabled = getattr(logging, level.upper(), logging.INFO) <= logging.INFO
        # Where rendered JSON lines go (``msg(bytes)``, ``flush()``); None on a TTY, where
        # lines go through the ordinary structlog logger instead.
        self.sink: _BufferedLines | None = None
        self._clock = _Clock()
        self.logger: Any = structlog.get_logger("gateway.access")
        # The line's fields are the server's own or scrubbed below, and its level and time
        # are set here: of the pipeline only the renderer is left, called directly (this
        # runs once per request).
        self._render = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if as_json and raw is not None:
            self.sink = _BufferedLines(raw, flush_s)

    def request(self, request: BaseRequest, status: int, seconds: float) -> None:
        note = getattr(request, "note", None)
        if note is None or not self._enabled:  # None: answered before any route saw it
            return
        usage, key = note.usage, note.key
        path = request.path
        if note.client_gone:
            status = CLIENT_CLOSED
        if status == 404:  # not one of our routes: the client chose the text
            path = scrub_text(path)
        fields = {
            "request_id": scrub_text(note.request_id) if note.client_chose_id else note.request_id,
            "method": request.method,
            "path": path,
            "status": status,
            "tier": note.tier,
            "attempts": note.attempts,
            "latency_ms": round(seconds * 1000, 2),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "key": key.name if key else None,
        }
        sink = self.sink
        if sink is None:
            self.logger.info("request", **fields)
            return
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = self._clock.now()
        sink.msg(self._render(None, "info", fields))

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()


class AccessLogger(AbstractAccessLogger):
    """aiohttp's hook, called after each response. aiohttp builds it from the runner's
    ``access_log`` argument, which is the runtime's ``AccessLog``."""

    logger: AccessLog  # type: ignore[assignment]

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.request(request, response.status, time)
