"""The daemon with the shipped local tiers (real SmolLM2 and MiniLM weights, CPU), used
as a new user would: the official openai client, streams, 16 at once, a hang-up, tools,
embeddings, a too-long prompt, and streaming failover landing on the local tier."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from tests.support.daemon import ROOT, InProcessDaemon
from tests.support.redis_server import start_redis
from tests.support.upstream import FakeUpstream, cut_after

pytestmark = pytest.mark.asyncio(loop_scope="module")


def shipped_local_tiers() -> str:
    """The [[tiers]] of the shipped config.toml whose kind is local, as TOML text."""
    text = (ROOT / "config.toml").read_text()
    blocks = text.split("[[tiers]]")[1:]
    local = [b for b in blocks if tomllib.loads(b).get("kind") == "local"]
    assert len(local) == 2
    return "".join("[[tiers]]" + b for b in local)


CONFIG = """
[server]
http = "127.0.0.1:{port}"
unix_socket = "{socket}"
state_dir = "{state}"

[redis]
url = "REDIS"

[routing]
retries = 0
first_token_timeout_s = 60
inter_token_timeout_s = 30
stream_failover = "resume"

[[tiers]]
name = "flaky"
kind = "openai"
base_url = "FLAKY"
model = "remote"
models = ["flaky-model"]
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(tmp_path_factory) -> AsyncIterator[tuple[InProcessDaemon, FakeUpstream]]:
    redis = start_redis()
    tmp = tmp_path_factory.mktemp("local")
    # The flaky remote tier answers "flaky-model" first; the local tier also answers that
    # name (it answers "auto"), so a resumed stream can land on it.
    async with FakeUpstream(reply="The capital of France is Paris, a city on the Seine.") as up:
        toml = (CONFIG.replace("REDIS", redis.url).replace("FLAKY", up.base_url)
                + shipped_local_tiers())
        d = InProcessDaemon(toml, Path(tmp))
        async with d:
            local = d.server.runtime.generation.providers["local"]
            embed = d.server.runtime.generation.providers["local-embed"]
            assert await local.wait_loaded(), local.load_error
            assert await embed.wait_loaded(), embed.load_error
            yield d, up
    redis.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(daemon) -> AsyncIterator[openai.AsyncOpenAI]:
    d, _ = daemon
    c = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    await c.close()


async def test_capital_of_france(client, daemon):
    d, _ = daemon
    raw = await client.chat.completions.with_raw_response.create(
        model="smollm2", temperature=0, max_tokens=30,
        messages=[{"role": "user", "content": "Which city is the capital of France?"}])
    reply = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "local"
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    tokenizer = d.server.runtime.generation.providers["local"].tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which city is the capital of France?"}],
        add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert 0 < reply.usage.completion_tokens <= 30


async def test_sixteen_streams_at_once_complete_with_usage(client, daemon):
    d, _ = daemon

    async def one(i: int) -> tuple[str, object, str | None]:
        stream = await client.chat.completions.create(
            model="smollm2", max_tokens=12, temperature=0.7, seed=i, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"Tell me a fact about the number {i}."}])
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, usage, finish

    results = await asyncio.gather(*(one(i) for i in range(16)))
    for text, usage, finish in results:
        assert usage is not None and usage.prompt_tokens > 10
        assert 0 < usage.completion_tokens <= 12
        assert finish in ("stop", "length")
        if finish == "length":
            assert usage.completion_tokens == 12
        assert text
    async with d.get("/readyz") as r:
        local = (await r.json())["tiers"]["local"]
    assert local["active"] == 0 and local["waiting"] == 0 and local["in_flight"] == 0


async def test_hanging_up_mid_stream_frees_the_slot(daemon):
    d, _ = daemon
    body = {"model": "smollm2", "max_tokens": 400, "stream": True,
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}
    async with d.post("/v1/chat/completions", json=body) as r:
        assert r.status == 200
        await r.content.readline()
        async with d.get("/readyz") as rr:
            assert (await rr.json())["tiers"]["local"]["active"] == 1
    # our side closed mid-stream: the engine must drop the sequence
    for _ in range(100):
        async with d.get("/readyz") as rr:
            local = (await rr.json())["tiers"]["local"]
        if local["active"] == 0 and local["in_flight"] == 0:
            break
        await asyncio.sleep(0.1)
    assert local["active"] == 0 and local["in_flight"] == 0


async def test_tools_reach_the_template_and_the_answer_is_well_formed(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    reply = await client.chat.completions.create(
        model="smollm2", max_tokens=60, temperature=0, tools=tools,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason == "tool_calls":
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        json.loads(call.function.arguments)


async def test_embeddings(client):
    out = await client.embeddings.create(model="all-minilm-l6-v2",
                                         input=["The cat sits on the mat.", "A cat is on a rug.",
                                                "Quarterly revenue rose 8%."])
    vecs = [e.embedding for e in out.data]
    assert [len(v) for v in vecs] == [384, 384, 384]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert abs(cos(vecs[0], vecs[0]) - 1) < 1e-4
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    assert out.usage.prompt_tokens > 0
    b64 = await client.embeddings.create(model="all-minilm-l6-v2", input="The cat sits on the mat.",
                                         encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)  # little-endian float32, as OpenAI sends
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == 384
    assert max(abs(x - y) for x, y in zip(decoded, vecs[0], strict=True)) < 1e-6
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=128)


async def test_too_long_prompt_is_a_400_that_says_so(client):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="smollm2", max_tokens=5,
            messages=[{"role": "user", "content": "word " * 9000}])
    assert "context" in str(info.value).lower()


async def test_broken_remote_stream_resumes_on_the_local_tier(daemon):
    d, up = daemon
    up.push(cut_after(5))
    body = {"model": "flaky-model", "max_tokens": 20, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]}
    async with d.post("/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["x-tiergate-tier"] == "flaky"
        text = await r.text()
    events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    content = "".join(c["delta"].get("content") or "" for e in events[:-1]
                      for c in json.loads(e)["choices"])
    # the remote tier's first five tokens, then the local model's continuation
    assert content.startswith("The capital of France is Paris")
    assert len(content) > len("The capital of France is Paris")
