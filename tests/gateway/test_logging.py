"""Logs are JSON lines off a TTY, and no secret reaches a line, whoever logged it."""

from __future__ import annotations

import io
import json
import logging

import structlog

from gateway.logging import REDACTED, configure_logging, redact_secrets


def test_secret_keys_and_tokens_in_text_are_redacted():
    event = redact_secrets(None, "info", {
        "event": "upstream_failed",
        "authorization": "Bearer sk-live-abcdef123456",
        "api_key": "hf_abcdefghijklmnop",
        "headers": {"Authorization": "Bearer xyz123456789", "Accept": "application/json"},
        "reason": "401 for key sk-proj-abcdefghijklmnopqrstuvwxyz",
        "detail": "sent Bearer abcdef1234567890 upstream",
        "tokens": 12,
        "key": "alice",
    })
    assert event["authorization"] == REDACTED
    assert event["api_key"] == REDACTED
    assert event["headers"]["Authorization"] == REDACTED
    assert event["headers"]["Accept"] == "application/json"
    assert "sk-proj" not in event["reason"] and REDACTED in event["reason"]
    assert "abcdef1234567890" not in event["detail"]
    assert event["tokens"] == 12 and event["key"] == "alice"


def test_json_lines_off_a_tty_for_structlog_and_stdlib_loggers():
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)
    try:
        structlog.get_logger("t").info("tier_failed", tier="a", authorization="Bearer sk-secret-000000")
        logging.getLogger("some.library").warning("token hf_secretsecretsecret leaked?")
    finally:
        configure_logging("info", "console")
    lines = [json.loads(ln) for ln in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "tier_failed" and lines[0]["level"] == "info"
    assert lines[0]["authorization"] == REDACTED
    assert "timestamp" in lines[0]
    assert "hf_secretsecretsecret" not in lines[1]["event"]
    assert "sk-secret" not in stream.getvalue()


async def test_access_lines_are_json_buffered_briefly_and_scrubbed():
    import asyncio

    from aiohttp.test_utils import make_mocked_request

    from gateway.accesslog import AccessLog, Note
    from providers.schemas import Usage

    class Stream(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.buffer = io.BufferedWriter(io.BytesIO(), buffer_size=1 << 16)

        def written(self) -> bytes:
            return self.buffer.raw.getvalue()

    stream = Stream()
    access = AccessLog("info", "auto", stream=stream, flush_s=0.05)
    served = make_mocked_request("POST", "/v1/chat/completions")
    served.note = Note("Bearer abcdefghijkl0123", client_chose_id=True, tier="local",
                        attempts=1, usage=Usage(7, 3))
    access.request(served, 200, 0.0015)
    lost = make_mocked_request("GET", "/v1/x/sk-abcdefghijklmnop")
    lost.note = Note("0123abcd")
    access.request(lost, 404, 0.0001)
    assert stream.written() == b""  # buffered, not one write per line
    await asyncio.sleep(0.2)  # the flush timer
    first, second = (json.loads(ln) for ln in stream.written().decode().splitlines())
    assert first["event"] == "request" and first["level"] == "info" and first["timestamp"].endswith("Z")
    assert first["status"] == 200 and first["tier"] == "local" and first["latency_ms"] == 1.5
    assert first["prompt_tokens"] == 7 and first["completion_tokens"] == 3
    assert "abcdefghijkl0123" not in first["request_id"]
    assert second["status"] == 404 and "sk-abcdefghijklmnop" not in second["path"]
    quiet = AccessLog("warning", "json", stream=stream)
    quiet.request(served, 200, 0.001)
    quiet.flush()
    assert stream.written().count(b"\n") == 2
