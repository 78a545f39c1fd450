"""Fallback, retries and streaming failover, end to end: a real daemon in front of real
(fake, misbehaving) upstream servers on loopback."""

from __future__ import annotations

import asyncio
import json
import time

from providers.registry import KINDS
from tests.gateway.conftest import SECRET, TWO_TIERS
from tests.support.throwaway import ECHO_KIND
from tests.support.upstream import (
    cut_after,
    delay,
    rate_limited,
    stall_after,
    stall_before_first,
    status,
)

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "say something"}]}


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def stream_text(events: list[str]) -> str:
    out = ""
    for e in events:
        if e == "[DONE]":
            continue
        payload = json.loads(e)
        for c in payload.get("choices", []):
            out += c["delta"].get("content") or ""
    return out


async def test_closed_port_falls_over_to_second_tier(make_daemon, upstreams):
    _, b = upstreams
    async with make_daemon(first=None) as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            body = await r.json()
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "second"
            # first tier: one try and one retry, then the second tier
            assert r.headers["x-tiergate-attempts"] == "3"
            assert r.headers["x-request-id"]
    assert body["choices"][0]["message"]["content"] == "Second tier answers here."
    assert body["model"] == "gpt-test"
    assert body["usage"]["completion_tokens"] == 4
    assert b.requests[-1].json["model"] == "upstream-b"


async def test_first_tier_serves_and_gets_the_key_and_unknown_fields(make_daemon, upstreams):
    a, b = upstreams
    async with make_daemon() as d:
        payload = {**CHAT, "logit_bias": {"42": 1}, "vendor_knob": {"x": 1}, "temperature": 0.3}
        async with d.post("/v1/chat/completions", json=payload) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "first"
            assert r.headers["x-tiergate-attempts"] == "1"
    sent = a.requests[-1]
    assert sent.json["vendor_knob"] == {"x": 1}
    assert sent.json["logit_bias"] == {"42": 1}
    assert sent.json["temperature"] == 0.3
    assert sent.json["model"] == "upstream-a"
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"
    assert b.count("/v1/chat/completions") == 0


async def test_500_retried_then_next_tier(make_daemon, upstreams):
    a, b = upstreams
    a.push(status(500), status(502))
    async with make_daemon() as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "second"
            assert r.headers["x-tiergate-attempts"] == "3"
    assert a.count("/v1/chat/completions") == 2


async def test_429_retry_after_is_honoured_on_the_same_tier(make_daemon, upstreams):
    a, b = upstreams
    a.push(rate_limited(retry_after=1))
    async with make_daemon() as d:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "first"
            assert r.headers["x-tiergate-attempts"] == "2"
        # The retry waited for the upstream's Retry-After, not the 10 ms backoff.
        assert loop.time() - started >= 0.9
    assert b.count("/v1/chat/completions") == 0


async def test_client_error_is_passed_through_without_failover(make_daemon, upstreams):
    a, b = upstreams
    upstream_error = {"error": {"message": "max_tokens is too large", "type": "invalid_request_error",
                                "param": "max_tokens", "code": "bad_max"}}
    a.push(status(400, upstream_error))
    async with make_daemon() as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 400
            assert await r.json() == upstream_error
    assert b.count("/v1/chat/completions") == 0


async def test_all_tiers_failing_gives_503_naming_each(make_daemon, upstreams):
    a, b = upstreams
    a.default = status(500)
    b.default = status(503)
    async with make_daemon() as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503
            err = (await r.json())["error"]
    assert err["code"] == "no_tier_available"
    assert "first" in err["message"] and "second" in err["message"]


async def test_stream_passes_through_with_usage_and_done(make_daemon):
    async with make_daemon() as d:
        payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        async with d.post("/v1/chat/completions", json=payload) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["x-tiergate-tier"] == "first"
            events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 15
    assert stream_text(events).startswith("The quick brown fox")
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk" and first["model"] == "gpt-test"


async def test_failure_before_first_token_is_invisible(make_daemon, upstreams):
    a, _ = upstreams
    a.push(stall_before_first(5), stall_before_first(5))  # both tries stall past the 1 s timeout
    async with make_daemon() as d:
        async with d.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "second"
            events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    assert stream_text(events) == "Second tier answers here."


async def test_cut_mid_stream_ends_with_error_event_never_done(make_daemon, upstreams):
    a, _ = upstreams
    a.push(cut_after(3))
    async with make_daemon(failover="error") as d:
        async with d.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            events = sse_events(await r.text())
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "upstream_stream_broken"
    assert stream_text(events[:-1]) == "The quick brown"


async def test_stall_mid_stream_is_caught_by_inter_token_timeout(make_daemon, upstreams):
    a, _ = upstreams
    a.push(stall_after(2, 30))
    async with make_daemon(failover="error") as d:
        async with d.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            events = sse_events(await asyncio.wait_for(r.text(), 10))
    assert "[DONE]" not in events
    assert "inter-token" in json.loads(events[-1])["error"]["message"]
    # the stalled upstream was hung up on
    await a.wait_disconnects(1)


async def test_cut_mid_stream_resumes_on_next_tier(make_daemon, upstreams):
    a, b = upstreams
    # The second tier continues the first tier's text (continue_final_message).
    b.reply = a.reply
    a.push(cut_after(4))
    async with make_daemon(failover="resume") as d:
        payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        async with d.post("/v1/chat/completions", json=payload) as r:
            events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    assert stream_text(events) == a.reply
    resumed = b.requests[-1].json
    assert resumed["continue_final_message"] is True
    assert resumed["messages"][-1] == {"role": "assistant", "content": "The quick brown fox"}
    roles = [c["delta"].get("role") for e in events[:-1] for c in json.loads(e)["choices"]]
    assert roles.count("assistant") == 1  # one role delta, not one per tier


class AccessLines:
    """Stands in for the access log's sink: keeps each rendered line's fields."""

    def __init__(self) -> None:
        self.lines: list[dict] = []

    def msg(self, line: bytes) -> None:
        self.lines.append(json.loads(line))

    def flush(self) -> None:
        pass


async def test_client_hangup_cancels_the_upstream(make_daemon, upstreams):
    a, _ = upstreams
    a.push(stall_after(2, 30))
    async with make_daemon() as d:
        access = d.server.runtime.access_log.sink = AccessLines()
        async with d.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            await r.content.readline()
        # leaving the block closed our connection mid-stream
        assert await a.wait_disconnects(1) == 1
        for _ in range(50):
            if access.lines:
                break
            await asyncio.sleep(0.05)
    # one access line, saying the client left
    assert [line["status"] for line in access.lines] == [499]
    assert access.lines[0]["tier"] == "first"


async def test_slow_non_stream_client_hangup_cancels_the_upstream(make_daemon, upstreams):
    a, _ = upstreams
    a.push(delay(30))
    async with make_daemon() as d:
        access = d.server.runtime.access_log.sink = AccessLines()
        with_timeout = d.post("/v1/chat/completions", json=CHAT)
        try:
            await asyncio.wait_for(with_timeout.__aenter__(), 0.5)
        except TimeoutError:
            pass
        assert await a.wait_disconnects(1) == 1
        for _ in range(50):
            if access.lines:
                break
            await asyncio.sleep(0.05)
    assert [line["status"] for line in access.lines] == [499]


async def test_circuit_opens_after_repeated_failures(make_daemon, upstreams):
    a, b = upstreams
    a.default = status(500)
    toml_extra = {"failover": "error"}
    async with make_daemon(**toml_extra) as d:
        for _ in range(5):  # each request fails the tier once (2 tries); it opens at 5
            async with d.post("/v1/chat/completions", json=CHAT) as r:
                assert r.headers["x-tiergate-tier"] == "second"
        calls = a.count("/v1/chat/completions")
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.headers["x-tiergate-tier"] == "second"
            assert r.headers["x-tiergate-attempts"] == "1"
        async with d.get("/readyz") as r:
            tiers = (await r.json())["tiers"]
    assert calls == 10
    assert a.count("/v1/chat/completions") == calls
    assert tiers["first"]["circuit"] == "open"


async def test_a_tier_whose_timeouts_are_final_fails_over_without_a_retry(make_daemon, upstreams, monkeypatch):
    """A local generation that ran out of time would run out again: its kind says so
    (``Capabilities.retry_timeouts``), and the walk moves on at once."""
    monkeypatch.setitem(KINDS, "echo", ECHO_KIND)
    toml = TWO_TIERS.replace('''[[tiers]]
name = "first"''', '''[[tiers]]
name = "slow"
kind = "echo"
model = "m"
models = ["gpt-test"]
delay_s = 5
timeout_s = 0.2
retry_timeouts = false

[[tiers]]
name = "first"''').replace("retries = 1", "retries = 2")
    async with make_daemon(toml=toml) as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "first"
            assert r.headers["x-tiergate-attempts"] == "2"
        slow = d.server.runtime.generation.tiers["slow"].provider
    assert slow.calls == 1


async def test_a_priced_first_tier_that_cannot_be_called_gives_its_hold_back(make_daemon, upstreams):
    """The admission holds the first ranked tier's worst case with the rate limits; when
    that tier turns out not to be callable (its model never loaded), the hold returns."""
    toml = TWO_TIERS.replace("[routing]", '[budgets]\nglobal = { daily_usd = 5.0 }\n\n[routing]').replace(
        '''[[tiers]]
name = "first"''', '''[[tiers]]
name = "unloaded"
kind = "local"
model = "/nonexistent/model.gguf"
models = ["gpt-test"]
price = { input = 1.0, output = 1.0 }

[[tiers]]
name = "first"''')
    async with make_daemon(toml=toml) as d:
        for _ in range(100):  # the load fails on its thread
            async with d.get("/readyz") as r:
                if "error" in (await r.json())["tiers"]["unloaded"]:
                    break
            await asyncio.sleep(0.05)
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "first"
        await d.server.runtime.background.drain(5)
        async with d.get("/admin/usage") as r:
            usage = (await r.json())["usage"]["day"]["global"]
    assert usage["budget_micros"] == 5_000_000
    assert usage["held_micros"] == 0
