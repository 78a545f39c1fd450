from __future__ import annotations

import asyncio
import email.utils
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from providers.base import ProviderStatus
from providers.errors import CapacityError, FatalError, RetryableError
from providers.http import openai_error_body, parse_retry_after
from providers.openai_compat import OpenAICompatProvider, OpenAITierConfig
from providers.schemas import ChatChunk, ChatRequest, EmbeddingRequest, Usage
from tests.support.redis_server import free_port
from tests.support.upstream import (
    REPLY,
    FakeUpstream,
    cut_after,
    raw_stream,
    rate_limited,
    stall_after,
    stall_before_first,
    status,
    tokens_of,
    vector_for,
)
from tests.support.wait import eventually

KEY = "sk-test-0123456789abcdef"
MESSAGES = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello to me"})
PROMPT_WORDS = 6


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def make_provider(upstream: FakeUpstream) -> AsyncIterator[Callable[..., Any]]:
    made: list[OpenAICompatProvider] = []

    async def make(api_key: str | None = KEY, **cfg: Any) -> OpenAICompatProvider:
        fields = {"name": "remote", "kind": "openai", "base_url": upstream.base_url, "model": "upstream-model", **cfg}
        provider = OpenAICompatProvider(OpenAITierConfig(**fields), api_key)
        await provider.start()
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


def chat_request(**changes: Any) -> ChatRequest:
    body = {"model": "client-model", "messages": [dict(m) for m in MESSAGES], "temperature": 0.2, "vendor_knob": {"x": 1}}
    req = ChatRequest(model="client-model", messages=MESSAGES, body=body, temperature=0.2)
    return req.replace(**changes)


async def collect(provider: OpenAICompatProvider, req: ChatRequest) -> list[ChatChunk]:
    return [chunk async for chunk in provider.stream(req)]


def text_of(chunks: list[ChatChunk]) -> str:
    return "".join(c.delta.get("content") or "" for chunk in chunks for c in chunk.choices)


# requests as the upstream sees them ---------------------------------------------------


async def test_it_reports_ready_once_started_and_not_after_closing(make_provider) -> None:
    provider = await make_provider()
    assert provider.ready and provider.status() == ProviderStatus(ready=True)
    await provider.aclose()
    assert not provider.ready and provider.status() == ProviderStatus(ready=False)
    with pytest.raises(RetryableError, match="not started"):
        await provider.chat(chat_request())


async def test_body_passes_through_with_the_tier_model(upstream, make_provider) -> None:
    provider = await make_provider()
    result = await provider.chat(chat_request(body={**chat_request().body, "stream_options": {"include_usage": True}}))
    sent = upstream.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["model"] == "upstream-model"
    assert sent.json["vendor_knob"] == {"x": 1}
    assert sent.json["temperature"] == 0.2
    assert sent.json["messages"] == [dict(m) for m in MESSAGES]
    assert sent.json["stream"] is False
    assert "stream_options" not in sent.json  # OpenAI rejects it on a non-stream call
    assert result.choices[0].message == {"role": "assistant", "content": REPLY}
    assert result.choices[0].finish_reason == "stop"
    assert result.usage == Usage(PROMPT_WORDS, len(tokens_of(REPLY)))
    assert result.model == "upstream-model"


@pytest.mark.parametrize("tier_model", ["auto", "*"])
async def test_an_auto_tier_model_keeps_the_client_model(upstream, make_provider, tier_model: str) -> None:
    provider = await make_provider(model=tier_model)
    await provider.chat(chat_request())
    assert upstream.requests[-1].json["model"] == "client-model"


async def test_bearer_key_and_configured_headers_are_sent(upstream, make_provider) -> None:
    provider = await make_provider(headers={"OpenAI-Organization": "org-1"})
    await provider.chat(chat_request())
    headers = upstream.requests[-1].headers
    assert headers.get("Authorization") == f"Bearer {KEY}"
    assert headers.get("OpenAI-Organization") == "org-1"


async def test_no_authorization_header_without_a_key(upstream, make_provider) -> None:
    provider = await make_provider(api_key=None)
    await provider.chat(chat_request())
    assert "Authorization" not in upstream.requests[-1].headers


async def test_a_request_without_a_wire_body_is_built_from_its_fields(upstream, make_provider) -> None:
    provider = await make_provider()
    await provider.chat(ChatRequest(model="m", messages=MESSAGES, max_tokens=3, stop=("x",), seed=7))
    sent = upstream.requests[-1].json
    assert sent["max_tokens"] == 3 and sent["stop"] == ["x"] and sent["seed"] == 7
    assert "temperature" not in sent


async def test_max_tokens_reaches_the_upstream(upstream, make_provider) -> None:
    provider = await make_provider()
    result = await provider.chat(chat_request(body={**chat_request().body, "max_tokens": 3}))
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].message["content"] == "".join(tokens_of(REPLY)[:3])
    assert result.usage.completion_tokens == 3


async def test_the_effective_max_tokens_goes_in_the_field_the_client_used(upstream, make_provider) -> None:
    provider = await make_provider()
    await provider.chat(chat_request(max_tokens=4))
    assert upstream.requests[-1].json["max_tokens"] == 4
    result = await provider.chat(chat_request(body={**chat_request().body, "max_completion_tokens": 10}, max_tokens=2))
    sent = upstream.requests[-1].json
    assert sent["max_completion_tokens"] == 2 and "max_tokens" not in sent
    assert result.usage.completion_tokens == 2


# answers ------------------------------------------------------------------------------


async def test_tool_calls_and_missing_usage_are_kept_as_given(upstream, make_provider) -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}],
    }
    upstream.push(status(200, {"id": "x", "model": "m", "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}))
    provider = await make_provider()
    result = await provider.chat(chat_request())
    assert result.choices[0].message == message
    assert result.choices[0].finish_reason == "tool_calls"
    assert result.usage == Usage(0, 0)


async def test_stream_yields_the_reply_then_a_usage_chunk(upstream, make_provider) -> None:
    provider = await make_provider()
    chunks = await collect(provider, chat_request())
    sent = upstream.requests[-1].json
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}  # asked even though the client did not
    assert sent["vendor_knob"] == {"x": 1}
    assert text_of(chunks) == REPLY
    assert chunks[0].choices[0].delta.get("role") == "assistant"
    assert [c.finish_reason for chunk in chunks for c in chunk.choices][-1] == "stop"
    assert chunks[-1].choices == ()
    assert chunks[-1].usage == Usage(PROMPT_WORDS, len(tokens_of(REPLY)))
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_resume_continues_the_final_assistant_message(upstream, make_provider) -> None:
    provider = await make_provider(can_resume=True)
    assert provider.capabilities.resume
    prefix = "".join(tokens_of(REPLY)[:4])
    chunks = await collect(provider, chat_request(assistant_prefix=prefix))
    sent = upstream.requests[-1].json
    assert sent["messages"][-1] == {"role": "assistant", "content": prefix}
    assert sent["continue_final_message"] is True
    assert sent["add_generation_prompt"] is False
    assert prefix + text_of(chunks) == REPLY


async def test_resume_on_a_tier_that_cannot_is_refused_without_calling_upstream(upstream, make_provider) -> None:
    provider = await make_provider()
    assert not provider.capabilities.resume
    with pytest.raises(CapacityError):
        await collect(provider, chat_request(assistant_prefix="The quick"))
    assert upstream.count() == 0


# error mapping ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 502, 503])
async def test_5xx_is_retryable(upstream, make_provider, code: int) -> None:
    upstream.push(status(code))
    provider = await make_provider()
    with pytest.raises(RetryableError) as info:
        await provider.chat(chat_request())
    assert info.value.status == code
    assert info.value.tier == "remote"


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [(rate_limited(2), 2.0), (rate_limited(1500, header="retry-after-ms"), 1.5)],
)
async def test_429_is_retryable_with_retry_after(upstream, make_provider, behaviour, expected: float) -> None:
    upstream.push(behaviour)
    provider = await make_provider()
    with pytest.raises(RetryableError) as info:
        await provider.chat(chat_request())
    assert info.value.status == 429
    assert info.value.retry_after == expected


def test_retry_after_as_an_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": header}, now=now) == 30.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


async def test_400_is_fatal_with_the_upstream_body(upstream, make_provider) -> None:
    body = {"error": {"message": "max_tokens is too large", "type": "invalid_request_error", "param": "max_tokens", "code": "too_large"}}
    upstream.push(status(400, body))
    provider = await make_provider()
    with pytest.raises(FatalError) as info:
        await provider.chat(chat_request())
    assert info.value.status == 400
    assert info.value.body == body
    assert info.value.param == "max_tokens"


async def test_an_echoed_key_never_reaches_messages_or_bodies(upstream, make_provider) -> None:
    upstream.push(status(401, {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error"}}))
    provider = await make_provider()
    with pytest.raises(FatalError) as info:
        await provider.chat(chat_request())
    assert info.value.status == 401
    assert KEY not in str(info.value)
    assert KEY not in json.dumps(info.value.body)
    assert "Incorrect API key provided" in info.value.body["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "message", "code"),
    [
        ({"error": "Model too busy"}, "Model too busy", None),
        ({"error": "bad input", "error_type": "validation"}, "bad input", "validation"),
        ({"object": "error", "message": "vllm says no", "type": "BadRequestError", "code": 400}, "vllm says no", None),
        ({"detail": "Not Found"}, "Not Found", None),
        ("plain text", "plain text", None),
        (None, "fallback", None),
    ],
)
def test_error_bodies_are_converted_to_the_openai_shape(payload, message: str, code) -> None:
    body = openai_error_body(payload, status=400, fallback="fallback")
    assert body == {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


async def test_a_closed_port_is_retryable() -> None:
    cfg = OpenAITierConfig(name="gone", kind="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", model="m")
    provider = OpenAICompatProvider(cfg, KEY)
    await provider.start()
    try:
        with pytest.raises(RetryableError, match="connect"):
            await provider.chat(chat_request())
        with pytest.raises(RetryableError, match="connect"):
            await collect(provider, chat_request())
        health = await provider.probe()
        assert not health.ok
    finally:
        await provider.aclose()


async def test_a_stream_cut_mid_way_raises_after_the_chunks_it_sent(upstream, make_provider) -> None:
    upstream.push(cut_after(3))
    provider = await make_provider()
    received: list[ChatChunk] = []
    with pytest.raises(RetryableError, match="ended early"):
        async for chunk in provider.stream(chat_request()):
            received.append(chunk)
    assert text_of(received) == "".join(tokens_of(REPLY)[:3])
    assert all(chunk.usage is None for chunk in received)


async def test_a_non_stream_answer_cut_is_retryable(upstream, make_provider) -> None:
    upstream.push(cut_after(0))
    provider = await make_provider()
    with pytest.raises(RetryableError):
        await provider.chat(chat_request())


async def test_a_stream_closed_without_done_is_retryable(upstream, make_provider) -> None:
    upstream.push(raw_stream('data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'))
    provider = await make_provider()
    with pytest.raises(RetryableError, match="ended early"):
        await collect(provider, chat_request())


async def test_an_error_event_mid_stream_is_raised(upstream, make_provider) -> None:
    upstream.push(
        raw_stream(
            'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n',
            'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
        )
    )
    provider = await make_provider()
    with pytest.raises(RetryableError, match="overloaded"):
        await collect(provider, chat_request())


async def test_an_awkwardly_split_stream_over_a_real_socket(upstream, make_provider) -> None:
    frames = 'data: {"choices": [{"index": 0, "delta": {"content": "héllo"}}]}\r\n\r\n: ping\r\n\r\ndata: [DONE]\r\n\r\n'.encode()
    upstream.push(raw_stream(*(frames[i : i + 5] for i in range(0, len(frames), 5))))
    provider = await make_provider()
    assert text_of(await collect(provider, chat_request())) == "héllo"


# cancellation reaches the upstream ----------------------------------------------------


@pytest.mark.parametrize("behaviour", [stall_after(2, 600), stall_before_first(600)])
async def test_cancelling_the_consumer_disconnects_the_upstream(upstream, make_provider, behaviour) -> None:
    upstream.push(behaviour)
    provider = await make_provider()
    started = asyncio.Event()
    received: list[ChatChunk] = []

    async def consume() -> None:
        async for chunk in provider.stream(chat_request()):
            received.append(chunk)
            if text_of(received) == "".join(tokens_of(REPLY)[:2]):
                started.set()

    task = asyncio.create_task(consume())
    if behaviour.stall_after is not None:
        await asyncio.wait_for(started.wait(), 10)
    else:
        await eventually(lambda: upstream.count() > 0, "the upstream request")
    assert upstream.disconnects == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await upstream.wait_disconnects(1) == 1


async def test_closing_the_stream_early_disconnects_the_upstream(upstream, make_provider) -> None:
    upstream.push(stall_after(1, 600))
    provider = await make_provider()
    stream = provider.stream(chat_request())
    first = await anext(stream)
    assert first.choices[0].delta.get("role") == "assistant"
    await stream.aclose()
    assert await upstream.wait_disconnects(1) == 1


# embeddings and probe -----------------------------------------------------------------


async def test_embeddings(upstream, make_provider) -> None:
    provider = await make_provider(task="embeddings", model="embed-model")
    assert provider.capabilities.embeddings
    result = await provider.embed(EmbeddingRequest(model="client", inputs=("one two", "three"), dimensions=4))
    sent = upstream.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.json == {"model": "embed-model", "input": ["one two", "three"], "encoding_format": "float", "dimensions": 4}
    assert [list(v) for v in result.vectors] == [vector_for("one two", 4), vector_for("three", 4)]
    assert result.usage == Usage(3, 0)


async def test_embedding_errors_map_like_chat(upstream, make_provider) -> None:
    upstream.push(status(400, {"error": "input too long"}))
    provider = await make_provider(task="embeddings")
    with pytest.raises(FatalError) as info:
        await provider.embed(EmbeddingRequest(model="m", inputs=("x",)))
    assert info.value.body["error"]["message"] == "input too long"


async def test_probe(upstream, make_provider) -> None:
    provider = await make_provider()
    health = await provider.probe()
    assert health.ok and health.latency_s is not None
    assert upstream.requests[-1].path == "/v1/models"
    upstream.models_behaviour = status(503)
    assert not (await provider.probe()).ok


async def test_a_provider_not_started_is_not_ready() -> None:
    provider = OpenAICompatProvider(OpenAITierConfig(name="n", kind="openai", base_url="http://127.0.0.1:9/v1", model="m"), None)
    assert not provider.ready
    with pytest.raises(RetryableError, match="not started"):
        await provider.chat(chat_request())
