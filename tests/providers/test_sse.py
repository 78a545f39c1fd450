from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable

import aiohttp
import pytest

from providers.errors import FatalError, RetryableError
from providers.sse import SSEDecoder, SSEEvent, iter_events, iter_openai_payloads


def decode_in_pieces(raw: bytes, size: int) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for i in range(0, len(raw), size):
        events += decoder.feed(raw[i : i + size])
    return events + decoder.close()


async def pieces(parts: Iterable[bytes], *, then: BaseException | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    if then is not None:
        raise then


async def payloads(parts: Iterable[bytes], *, then: BaseException | None = None) -> list[dict]:
    return [p async for p in iter_openai_payloads(pieces(parts, then=then), tier="t")]


SAMPLE = (
    ": keep-alive comment\n"
    "event: update\n"
    "id: 7\n"
    "retry: 1500\n"
    "data: first line\n"
    "data:second line\n"
    "\n"
    "data: {\"x\": \"héllo ✓\"}\n"
    "\n"
)
EXPECTED = [
    SSEEvent(data="first line\nsecond line", event="update", id="7", retry=1500),
    SSEEvent(data='{"x": "héllo ✓"}', event="message", id="7", retry=1500),
]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_line_ending_and_every_split_point_give_the_same_events(newline: str) -> None:
    raw = SAMPLE.replace("\n", newline).encode()
    for size in range(1, len(raw) + 1):
        assert decode_in_pieces(raw, size) == EXPECTED, (newline, size)


def test_a_crlf_split_between_pieces_is_one_line_break() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == []
    assert decoder.feed(b"\n") == [SSEEvent(data="a")]


def test_a_last_event_without_a_blank_line_is_delivered_at_eof() -> None:
    assert decode_in_pieces(b"data: one\n\ndata: two", 3) == [SSEEvent(data="one"), SSEEvent(data="two")]


def test_fields_without_data_and_comments_dispatch_nothing() -> None:
    assert decode_in_pieces(b": ping\n\nevent: x\n\n:another\n\n", 4) == []


def test_a_byte_order_mark_at_the_start_is_ignored() -> None:
    assert decode_in_pieces("\ufeffdata: a\n\n".encode(), 1) == [SSEEvent(data="a")]


async def test_iter_events_reads_an_async_byte_stream() -> None:
    events = [e async for e in iter_events(pieces([b"data: 1\n", b"\ndata: 2\n\n"]))]
    assert [e.data for e in events] == ["1", "2"]


async def test_openai_payloads_stop_at_done() -> None:
    got = await payloads([b'data: {"a": 1}\n\n', b"data: [DONE]\n\n", b'data: {"after": true}\n\n'])
    assert got == [{"a": 1}]


async def test_done_without_the_space_and_with_crlf_is_recognised() -> None:
    assert await payloads([b'data:{"a":1}\r\n\r\ndata:[DONE]\r\n\r\n']) == [{"a": 1}]


async def test_a_stream_that_ends_without_done_is_an_error_not_a_clean_end() -> None:
    with pytest.raises(RetryableError, match="ended early"):
        await payloads([b'data: {"a": 1}\n\n'])


async def test_a_reset_mid_stream_is_retryable() -> None:
    with pytest.raises(RetryableError, match="ended early"):
        await payloads([b'data: {"a": 1}\n\n'], then=aiohttp.ClientPayloadError("cut"))
    with pytest.raises(RetryableError, match="ended early"):
        await payloads([b'data: {"a": 1}\n\n'], then=ConnectionResetError())


async def test_an_openai_error_payload_mid_stream_is_a_server_error() -> None:
    err = {"error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}}
    with pytest.raises(RetryableError, match="The server had an error") as info:
        await payloads([b'data: {"a": 1}\n\n', f"data: {json.dumps(err)}\n\n".encode()])
    assert info.value.status == 500


async def test_a_tgi_validation_error_event_is_fatal_with_an_openai_body() -> None:
    err = {"error": "Input validation error: `inputs` too long", "error_type": "validation"}
    with pytest.raises(FatalError) as info:
        await payloads([f"event: error\ndata: {json.dumps(err)}\n\n".encode()])
    assert info.value.status == 400
    assert info.value.body["error"]["message"] == err["error"]
    assert info.value.body["error"]["code"] == "validation"


async def test_a_tgi_generation_error_event_is_retryable() -> None:
    err = {"error": "CUDA out of memory", "error_type": "generation"}
    with pytest.raises(RetryableError, match="CUDA out of memory"):
        await payloads([f"event: error\ndata: {json.dumps(err)}\n\n".encode()])


async def test_an_error_event_with_plain_text_data_is_an_error() -> None:
    with pytest.raises(RetryableError, match="boom"):
        await payloads([b"event: error\ndata: boom\n\n"])


async def test_a_usage_chunk_with_null_error_field_is_not_an_error() -> None:
    chunk = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}, "error": None}
    assert await payloads([f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()]) == [chunk]


async def test_garbage_data_is_retryable() -> None:
    with pytest.raises(RetryableError, match="bad stream event"):
        await payloads([b"data: {not json\n\n"])
