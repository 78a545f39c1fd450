"""Extending the daemon the way DESIGN.md promises: a new provider kind is one module
plus one registry line, a new policy is one class; and a new generation (what a reload
builds) is swapped in while requests run."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.config import ConfigError, parse_config
from providers.registry import KINDS
from tests.gateway.conftest import TWO_TIERS
from tests.support.throwaway import ECHO_KIND
from tests.support.upstream import ok

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "say something"}]}

ECHO_FIRST = TWO_TIERS.replace('''[[tiers]]
name = "first"''', '''[[tiers]]
name = "echo"
kind = "echo"
model = "echo-model"
models = ["gpt-test"]
reply = "hello from the echo tier"

[[tiers]]
name = "first"''')


def filled(toml: str) -> str:
    """``toml`` with its placeholders filled, for parsing alone."""
    for name, value in {"port": "1", "socket": "/tmp/x.sock", "state": "/tmp/state", "redis": "redis://127.0.0.1:1/0",
                        "failover": "error", "first": "http://127.0.0.1:9/v1", "second": "http://127.0.0.1:9/v1"}.items():
        toml = toml.replace("{" + name + "}", value)
    return toml


@pytest.fixture
def echo_kind(monkeypatch):
    monkeypatch.setitem(KINDS, "echo", ECHO_KIND)  # the one registry line


async def test_a_new_kind_serves_with_one_module_and_one_registry_line(make_daemon, echo_kind):
    async with make_daemon(toml=ECHO_FIRST) as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "echo"
            body = await r.json()
        async with d.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            text = await r.text()
        async with d.get("/readyz") as r:
            tiers = (await r.json())["tiers"]
    assert body["choices"][0]["message"]["content"] == "hello from the echo tier"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    events = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"]) == \
        "hellofromtheechotier"
    assert tiers["echo"]["kind"] == "echo" and tiers["echo"]["ready"] is True


def test_the_new_kinds_own_fields_are_validated_with_the_line_at_fault(echo_kind):
    text = filled(ECHO_FIRST.replace('reply = "hello from the echo tier"', 'delay_s = "slow"'))
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    line = text.splitlines().index('delay_s = "slow"') + 1
    assert err.value.where == f"<config>:{line} [tiers[0].delay_s]"


def test_without_its_registry_line_the_kind_is_unknown():
    with pytest.raises(ConfigError, match="does not match any of the expected tags: 'openai', 'huggingface', 'local'"):
        parse_config(filled(ECHO_FIRST))


async def test_the_walk_follows_a_users_policy_and_shows_it_the_tiers(make_daemon):
    toml = (TWO_TIERS.replace('policy = "file_order"', "")
            .replace("[routing]", '[routing]\npolicy = "tests.support.throwaway:CheapestFirst"')
            .replace('model = "upstream-a"', 'model = "upstream-a"\nprice = { input = 1.0, output = 2.0 }'))
    async with make_daemon(toml=toml) as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "second"
        seen = {v.name: v for v in d.server.runtime.generation.policy.seen}
    assert seen["first"].price_input == 1.0 and seen["first"].position == 0
    assert seen["second"].price_input == 0.0 and seen["second"].position == 1
    assert seen["second"].healthy and not seen["second"].circuit_open


async def test_a_static_policy_is_asked_once_per_model(make_daemon, monkeypatch):
    calls = []

    class Counted:
        name, static_order = "counted", True

        def rank(self, request, tiers):
            calls.append(request.model)
            return [t.name for t in reversed(tiers)]

    from policies import POLICIES

    monkeypatch.setitem(POLICIES, "counted", Counted)
    toml = TWO_TIERS.replace("[routing]", '[routing]\npolicy = "counted"')
    async with make_daemon(toml=toml) as d:
        for _ in range(3):
            async with d.post("/v1/chat/completions", json=CHAT) as r:
                assert r.headers["x-tiergate-tier"] == "second"
    assert calls == ["gpt-test"]


async def test_a_new_generation_takes_new_requests_while_old_ones_finish(make_daemon, upstreams):
    a, b = upstreams
    a.push(ok(token_delay_s=0.05))  # a stream on the first tier that takes ~1 s
    async with make_daemon() as d:
        rt = d.server.runtime
        old = rt.generation
        async with d.post("/v1/chat/completions", json={**CHAT, "stream": True}) as streaming:
            assert streaming.headers["x-tiergate-tier"] == "first"
            # The edit: the first tier no longer answers gpt-test; the second is unchanged.
            edited = parse_config(d.toml.replace('models = ["gpt-test"]\napi_key_env',
                                                 'models = ["other"]\napi_key_env'))
            replaced = await rt.install(edited)
            assert replaced is old and rt.generation is not old
            async with d.post("/v1/chat/completions", json=CHAT) as r:
                assert r.headers["x-tiergate-tier"] == "second"
            text = await asyncio.wait_for(streaming.text(), 10)
    new = rt.generation
    assert "data: [DONE]" in text  # the stream finished on the generation it began on
    assert new.tiers["second"].provider is old.tiers["second"].provider
    assert new.tiers["first"].provider is not old.tiers["first"].provider
    assert new.router.public_models() == ["other", "gpt-test"]


async def test_a_new_generations_keys_apply_to_the_next_request(make_daemon):
    from tracking import hash_key

    async with make_daemon() as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200  # no keys configured: open
        key = "tg-test-new-key-0123456789"
        edited = parse_config(d.toml + f'\n[[keys]]\nname = "ann"\nsha256 = "{hash_key(key)}"\n')
        await d.server.runtime.install(edited)
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 401
        async with d.post("/v1/chat/completions", json=CHAT,
                          headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
