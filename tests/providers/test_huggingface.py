from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from providers.errors import FatalError, RetryableError
from providers.huggingface import HF_ROUTER_URL, HuggingFaceProvider, HuggingFaceTierConfig, pooled
from providers.schemas import ChatRequest, EmbeddingRequest
from tests.support.upstream import REPLY, FakeUpstream, cut_after, hf_loading, status, vector_for

TOKEN = "hf_test_token_abcdef"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MESSAGES = ({"role": "user", "content": "hello there"},)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


def hf_config(**fields: Any) -> HuggingFaceTierConfig:
    return HuggingFaceTierConfig(**{"name": "hf", "model": MODEL, **fields})


@pytest.fixture
async def router(upstream: FakeUpstream) -> AsyncIterator[HuggingFaceProvider]:
    """A router-mode tier (no base_url) with the fake upstream standing in for the router."""
    cfg = hf_config()
    provider = HuggingFaceProvider(cfg, cfg.resolve_api_key({"HF_TOKEN": TOKEN}), router_url=upstream.base_url)
    await provider.start()
    yield provider
    await provider.aclose()


def chat_request() -> ChatRequest:
    return ChatRequest(model="chat", messages=MESSAGES, body={"model": "chat", "messages": list(MESSAGES)})


@pytest.mark.parametrize(
    ("base_url", "api_root"),
    [
        (None, HF_ROUTER_URL),
        ("https://xyz.endpoints.huggingface.cloud", "https://xyz.endpoints.huggingface.cloud/v1"),
        ("https://xyz.endpoints.huggingface.cloud/", "https://xyz.endpoints.huggingface.cloud/v1"),
        ("https://xyz.endpoints.huggingface.cloud/v1", "https://xyz.endpoints.huggingface.cloud/v1"),
        ("https://router.huggingface.co/v1/", HF_ROUTER_URL),
    ],
)
def test_api_root(base_url: str | None, api_root: str) -> None:
    provider = HuggingFaceProvider(hf_config(base_url=base_url), None)
    assert provider.api_root == api_root
    assert provider.on_router == (api_root == HF_ROUTER_URL)
    assert provider.kind == "huggingface"


def test_router_feature_extraction_url() -> None:
    provider = HuggingFaceProvider(hf_config(), None)
    assert (
        provider.feature_extraction_url("BAAI/bge-small-en-v1.5:hf-inference")
        == "https://router.huggingface.co/hf-inference/models/BAAI/bge-small-en-v1.5/pipeline/feature-extraction"
    )


async def test_router_chat_sends_the_hf_token_and_model(upstream, router) -> None:
    result = await router.chat(chat_request())
    sent = upstream.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers.get("Authorization") == f"Bearer {TOKEN}"
    assert sent.json["model"] == MODEL
    assert result.choices[0].message["content"] == REPLY


async def test_router_stream_and_cut(upstream, router) -> None:
    chunks = [c async for c in router.stream(chat_request())]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    upstream.push(cut_after(2))
    with pytest.raises(RetryableError, match="ended early"):
        async for _ in router.stream(chat_request()):
            pass


async def test_a_tgi_endpoint_gets_v1_appended(upstream) -> None:
    provider = HuggingFaceProvider(hf_config(base_url=upstream.root, model="tgi"), None)
    await provider.start()
    try:
        result = await provider.chat(chat_request())
    finally:
        await provider.aclose()
    assert upstream.requests[-1].path == "/v1/chat/completions"
    assert "Authorization" not in upstream.requests[-1].headers
    assert result.choices[0].message["content"] == REPLY


async def test_a_model_still_loading_is_retryable_after_its_estimate(upstream, router) -> None:
    upstream.push(hf_loading(estimated_time=17.5, model=MODEL))
    with pytest.raises(RetryableError, match="currently loading") as info:
        await router.chat(chat_request())
    assert info.value.status == 503
    assert info.value.retry_after == 17.5


async def test_a_plain_text_error_becomes_an_openai_error(upstream, router) -> None:
    upstream.push(status(422, {"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"}))
    with pytest.raises(FatalError) as info:
        await router.chat(chat_request())
    assert info.value.status == 422
    assert info.value.body == {
        "error": {
            "message": "Input validation error: `temperature` must be strictly positive",
            "type": "invalid_request_error",
            "param": None,
            "code": "validation",
        }
    }


async def test_a_503_without_an_estimate_is_plainly_retryable(upstream, router) -> None:
    upstream.push(status(503, {"error": "Service Unavailable"}))
    with pytest.raises(RetryableError) as info:
        await router.chat(chat_request())
    assert info.value.retry_after is None


async def test_router_embeddings_use_feature_extraction(upstream) -> None:
    cfg = hf_config(task="embeddings", model="sentence-transformers/all-MiniLM-L6-v2:hf-inference")
    provider = HuggingFaceProvider(cfg, TOKEN, router_url=upstream.base_url)
    await provider.start()
    try:
        result = await provider.embed(EmbeddingRequest(model="embed", inputs=("one", "two words")))
    finally:
        await provider.aclose()
    sent = upstream.requests[-1]
    assert sent.path == "/hf-inference/models/sentence-transformers/all-MiniLM-L6-v2/pipeline/feature-extraction"
    assert sent.json == {"inputs": ["one", "two words"]}
    assert sent.headers.get("Authorization") == f"Bearer {TOKEN}"
    assert [list(v) for v in result.vectors] == [vector_for("one"), vector_for("two words")]


async def test_router_embedding_errors_are_mapped(upstream, router) -> None:
    upstream.push(hf_loading(estimated_time=3))
    with pytest.raises(RetryableError) as info:
        await router.embed(EmbeddingRequest(model="embed", inputs=("one",)))
    assert info.value.retry_after == 3


async def test_a_tei_endpoint_embeds_the_openai_way(upstream) -> None:
    provider = HuggingFaceProvider(hf_config(base_url=upstream.root, task="embeddings", model="tei"), None)
    await provider.start()
    try:
        result = await provider.embed(EmbeddingRequest(model="embed", inputs=("alpha",)))
    finally:
        await provider.aclose()
    sent = upstream.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.json["input"] == ["alpha"]
    assert [list(v) for v in result.vectors] == [vector_for("alpha")]


async def test_probe_on_the_router(upstream, router) -> None:
    assert (await router.probe()).ok
    assert upstream.requests[-1].path == "/v1/models"


def test_token_level_features_are_mean_pooled() -> None:
    assert pooled([[1.0, 2.0], [3.0, 4.0]]) == [2.0, 3.0]
    assert pooled([0.5, 0.25]) == [0.5, 0.25]
