"""Structured logging: structlog processors in a pipeline, JSON lines off a TTY
(systemd's journal), readable console output on one. A redaction processor runs last
before rendering so that no secret reaches a log line, whoever logged it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import orjson
import structlog

_SECRET_KEYS = re.compile(
    r"(authorization|api[-_]?key|token|secret|password|passwd|cookie|credential|bearer)",
    re.IGNORECASE,
)
# Bearer tokens and common key shapes inside free text.
_SECRET_TEXT = re.compile(
    r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}|\b(sk|hf|tg)[-_][A-Za-z0-9_-]{8,}"
)
REDACTED = "[redacted]"


# The shortest text _SECRET_TEXT can match ("sk-" and 8 more): shorter text is clean.
_MIN_SECRET_TEXT = 11
# Values that cannot hold a secret; most of a log line (counts, latencies, flags).
_PLAIN = frozenset({int, float, bool, type(None)})


def scrub_text(value: str) -> str:
    if len(value) < _MIN_SECRET_TEXT:
        return value
    return _SECRET_TEXT.sub(lambda m: (m.group(1) or "") + REDACTED, value)


def _scrub(value: Any, depth: int = 0) -> Any:
    if type(value) in _PLAIN or depth > 4:
        return value
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k) else _scrub(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


# Context keys that name a secret's *source* or a token count, not a secret.
_ALLOWED = frozenset({"key", "key_name", "key_source", "tokens", "prompt_tokens",
                      "completion_tokens", "total_tokens", "api_key_env"})
# Fast path: docs/BENCHMARKS.md "redaction answers cached per key".
# Context key -> whether it names a secret. Log call sites use a small, fixed set of
# keys, so the answer is remembered (bounded, in case some caller makes keys up).
_secret_key_cache: dict[str, bool] = {}
_SECRET_KEY_CACHE_MAX = 4096


def _is_secret_key(key: str) -> bool:
    known = _secret_key_cache.get(key)
    if known is None:
        known = key not in _ALLOWED and _SECRET_KEYS.search(key) is not None
        if len(_secret_key_cache) < _SECRET_KEY_CACHE_MAX:
            _secret_key_cache[key] = known
    return known


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: drop secret-looking values, scrub tokens from text."""
    for k, v in list(event_dict.items()):
        if _is_secret_key(k):
            event_dict[k] = REDACTED
        elif type(v) not in _PLAIN:
            event_dict[k] = _scrub(v)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog (and the stdlib root logger it feeds) once, at start or reload."""
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not isatty(stream))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=isatty(stream))
    )
    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # Loggers are module-level proxies: cache the bound logger on first use, so the
        # hot path (one access line per request) does not rebuild it on every call.
        cache_logger_on_first_use=True,
    )
    # Libraries that use stdlib logging (aiohttp, transformers) go through the same
    # redaction and rendering.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_secrets,
                renderer,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric < logging.INFO else numeric)
    # aiohttp's own access log is replaced by ours.
    logging.getLogger("aiohttp.access").disabled = True


def _json_line(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


def isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
