"""HTTP plumbing shared by the remote tiers: one pooled session, and upstream failures
mapped to the typed errors of ``providers.errors``.

- transport failures (connect refused, reset, payload cut, timeout) and 5xx
  -> ``RetryableError``
- 429 -> ``RetryableError`` with ``retry_after`` from ``Retry-After`` (delta-seconds or an
  HTTP-date) or ``retry-after-ms``
- any other 4xx -> ``FatalError`` carrying the upstream status and its error body in the
  OpenAI shape ``{"error": {"message", "type", "param", "code"}}``

Secrets: callers pass the API key as ``secret`` and every message or body built here has
it masked, so an upstream that echoes a key cannot leak it into a log or a client reply.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
import structlog

from providers.config import RemoteTierConfig
from providers.errors import FatalError, ProviderError, RetryableError, error_body, error_type_for

log = structlog.get_logger(__name__)

# What transport_error maps: aiohttp's client errors, timeouts, and raw socket errors.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError, OSError)

_MASK = "***"
_MAX_MESSAGE_CHARS = 2000


def client_timeout(cfg: RemoteTierConfig) -> aiohttp.ClientTimeout:
    """Connect fast; the whole call, body read included, within the tier's ``timeout_s``.

    The router relies on this bound (``Capabilities.self_timed``) and adds its own timer
    only when the request's deadline is nearer; it enforces first-token and inter-token
    timeouts itself. No per-read timeout: ``total`` already bounds every read, and a
    per-read timer would be re-armed on every packet.
    """
    return aiohttp.ClientTimeout(
        total=cfg.timeout_s,
        connect=cfg.connect_timeout_s,
        sock_connect=cfg.connect_timeout_s,
    )


def create_session(cfg: RemoteTierConfig, headers: Mapping[str, str] | None = None) -> aiohttp.ClientSession:
    """A pooled session for one tier. Call from inside the running event loop."""
    connector = aiohttp.TCPConnector(limit=cfg.max_connections, limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=client_timeout(cfg),
        headers=dict(headers or {}),
        raise_for_status=False,
    )


def auth_headers(cfg: RemoteTierConfig, api_key: str | None) -> dict[str, str]:
    """The tier's configured headers plus ``Authorization: Bearer`` when a key is set."""
    headers = dict(cfg.headers)
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def mask(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced, and cut to a sane length."""
    if secret:
        text = text.replace(secret, _MASK)
    return text[:_MAX_MESSAGE_CHARS]


def _mask_tree(value: Any, secret: str | None) -> Any:
    if not secret:
        return value
    if isinstance(value, str):
        return value.replace(secret, _MASK)
    if isinstance(value, dict):
        return {k: _mask_tree(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_tree(v, secret) for v in value]
    return value


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP-date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            log.info("retry_after_unparsed", header="retry-after-ms", value=raw_ms[:64])
    raw = headers.get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        log.info("retry_after_unparsed", header="Retry-After", value=raw[:64])
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def decode_json(raw: bytes) -> Any:
    """The JSON in ``raw``, or None when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def openai_error_body(payload: Any, *, status: int, fallback: str) -> dict[str, Any]:
    """An upstream error payload in the OpenAI shape.

    Accepts OpenAI's own ``{"error": {...}}``, Hugging Face / TGI's ``{"error": "text",
    "error_type": ...}``, vLLM's older ``{"object": "error", "message": ...}`` and
    FastAPI's ``{"detail": ...}``; anything else becomes a body around ``fallback``.
    """
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return {
                "error": {
                    "message": err["message"],
                    "type": err.get("type") or error_type_for(status),
                    "param": err.get("param"),
                    "code": err.get("code"),
                }
            }
        code = payload.get("error_type") or payload.get("code")
        code = code if isinstance(code, str) else None
        if isinstance(err, str):
            return error_body(err, status=status, code=code)
        if isinstance(payload.get("message"), str):
            return error_body(payload["message"], status=status, code=code, param=payload.get("param"))
        detail = payload.get("detail")
        if detail is not None:
            text = detail if isinstance(detail, str) else json.dumps(detail)
            return error_body(text, status=status, code=code)
    if isinstance(payload, str) and payload:
        return error_body(payload, status=status)
    return error_body(fallback, status=status)


def error_from_payload(
    status: int,
    headers: Mapping[str, str],
    payload: Any,
    *,
    tier: str,
    secret: str | None = None,
) -> ProviderError:
    """The typed error for an upstream answer with ``status`` >= 400 (or an error sent
    inside a stream), from its decoded body."""
    body = _mask_tree(openai_error_body(payload, status=status, fallback=f"upstream answered {status}"), secret)
    message = mask(body["error"]["message"], secret)
    if status == 429 or status == 408 or status >= 500:
        what = "upstream rate limited" if status == 429 else f"upstream {status}"
        return RetryableError(f"{what}: {message}", tier=tier, status=status, retry_after=parse_retry_after(headers))
    return FatalError(
        message,
        tier=tier,
        status=status,
        body=body,
        code=body["error"].get("code"),
        param=body["error"].get("param"),
    )


async def read_error_payload(resp: aiohttp.ClientResponse, *, tier: str) -> Any:
    """A failed response's body: its JSON, else its text ("" when it cannot be read)."""
    try:
        raw = await resp.read()
    except TRANSPORT_ERRORS as exc:
        log.info("upstream_error_body_unread", tier=tier, status=resp.status, error=type(exc).__name__)
        return ""
    payload = decode_json(raw)
    if payload is None:
        return raw[:_MAX_MESSAGE_CHARS].decode("utf-8", "replace").strip()
    return payload


def transport_error(exc: BaseException, *, tier: str, secret: str | None = None) -> RetryableError:
    """A connect error, reset, cut payload or timeout: worth another try elsewhere."""
    if isinstance(exc, asyncio.TimeoutError):
        what = "upstream timed out"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        what = "upstream connect failed"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        what = "upstream disconnected"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        what = "upstream response cut"
    else:
        what = "upstream transport error"
    detail = mask(str(exc), secret)
    message = f"{what}: {type(exc).__name__}" + (f": {detail}" if detail else "")
    return RetryableError(message, tier=tier)

