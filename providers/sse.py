"""Server-Sent Events, read incrementally, and OpenAI-style streams on top of them.

``SSEDecoder`` follows the WHATWG event-stream rules: lines end in CRLF, LF or CR (a CR
at the end of one network piece may pair with an LF at the start of the next); ``data:``
with or without the space; several ``data`` lines joined by "\\n"; ``event``, ``id`` and
``retry`` fields; lines starting with ":" are comments. Unlike a browser it also
dispatches a last event that the peer closed without a blank line after it.

``iter_openai_payloads`` turns an upstream's byte stream into the JSON payloads of an
OpenAI chat-completion stream, ending at ``data: [DONE]``. An ``event: error`` or a
``{"error": ...}`` payload mid-stream (OpenAI, TGI) raises a typed error, and a stream
that ends before ``[DONE]``, cleanly or by a reset, raises
``RetryableError("upstream stream ended early")``: a broken stream never ends cleanly.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from providers.errors import ProviderError, RetryableError
from providers.http import TRANSPORT_ERRORS, error_from_payload, mask

log = structlog.get_logger(__name__)

DONE = "[DONE]"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# TGI's error_type values that mean the request itself is at fault.
_CLIENT_ERROR_TYPES = frozenset({"invalid_request_error", "validation", "BadRequestError"})


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed it bytes as they arrive; it returns the events completed so far."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # an unfinished line, carried to the next piece
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, piece: bytes) -> list[SSEEvent]:
        return self._consume(self._text.decode(piece), final=False)

    def close(self) -> list[SSEEvent]:
        """End of stream: flush the last line and a last event with no blank line after."""
        events = self._consume(self._text.decode(b"", final=True), final=True)
        if self._pending:
            self._line(self._pending, events)
            self._pending = ""
        self._dispatch(events)
        return events

    def _consume(self, text: str, *, final: bool) -> list[SSEEvent]:
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        text = self._pending + text
        events: list[SSEEvent] = []
        start = 0
        for match in _LINE_BREAK.finditer(text):
            if match.group() == "\r" and match.end() == len(text) and not final:
                break  # the LF of a CRLF may be in the next piece
            self._line(text[start : match.start()], events)
            start = match.end()
        self._pending = text[start:]
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isdigit():
                self._retry = int(value)

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data:
            events.append(
                SSEEvent(
                    data="\n".join(self._data),
                    event=self._event or "message",
                    id=self._last_id,
                    retry=self._retry,
                )
            )
        self._data = []
        self._event = ""


async def iter_events(pieces: AsyncIterable[bytes]) -> AsyncIterator[SSEEvent]:
    """Every event in a byte stream, the last one included even without a blank line."""
    decoder = SSEDecoder()
    async for piece in pieces:
        for event in decoder.feed(piece):
            yield event
    for event in decoder.close():
        yield event


def stream_error(payload: Any, *, tier: str, secret: str | None = None) -> ProviderError:
    """The typed error for an error sent inside a stream (there is no HTTP status then)."""
    err = payload.get("error", payload) if isinstance(payload, dict) else payload
    status = 500
    if isinstance(err, dict):
        code, kind = err.get("code"), err.get("type")
    elif isinstance(payload, dict):
        code, kind = payload.get("code"), payload.get("error_type")
    else:
        code, kind = None, None
    if isinstance(code, int) and 400 <= code <= 599:
        status = code
    elif isinstance(code, str) and code.isdigit() and 400 <= int(code) <= 599:
        status = int(code)
    elif kind in _CLIENT_ERROR_TYPES:
        status = 400
    elif kind == "overloaded":
        status = 503
    return error_from_payload(status, {}, payload, tier=tier, secret=secret)


async def iter_openai_payloads(
    pieces: AsyncIterable[bytes], *, tier: str, secret: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an OpenAI-style stream, up to ``[DONE]``.

    Raises ``RetryableError`` when the stream ends or breaks before ``[DONE]``, and the
    mapped error when the upstream reports one mid-stream.
    """
    try:
        async for event in iter_events(pieces):
            data = event.data.strip()
            if data == DONE:
                return
            if not data:
                continue
            try:
                payload = orjson.loads(data)
            except ValueError:
                if event.event == "error":
                    raise stream_error(data, tier=tier, secret=secret) from None
                raise RetryableError(
                    f"upstream sent a bad stream event: {mask(data[:200], secret)}", tier=tier
                ) from None
            if event.event == "error" or (
                isinstance(payload, dict) and payload.get("error") is not None and not payload.get("choices")
            ):
                raise stream_error(payload, tier=tier, secret=secret)
            if not isinstance(payload, dict):
                raise RetryableError("upstream sent a stream event that is not an object", tier=tier)
            yield payload
    except TRANSPORT_ERRORS as exc:
        log.info("upstream_stream_broken", tier=tier, error=type(exc).__name__)
        raise RetryableError(f"upstream stream ended early: {type(exc).__name__}", tier=tier) from exc
    log.info("upstream_stream_no_done", tier=tier)
    raise RetryableError("upstream stream ended early", tier=tier)
