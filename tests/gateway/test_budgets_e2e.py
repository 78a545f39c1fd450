"""Issue 4's checks, end to end: daemons as processes sharing one real Redis.

- A budget that affords exactly N calls of a priced tier, many more concurrent requests
  over two daemons: exactly N reach the priced tier, the rest fall to the free tier.
- A daemon SIGKILLed while holding budget: the hold expires and the money returns.
- Redis stopped under load and restarted: no request lost, every usage record counted
  exactly once after replay.
- A key's requests-per-minute holds across two daemons.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.daemon import SubprocessDaemon
from tests.support.redis_server import RedisServer, free_port
from tests.support.upstream import FakeUpstream, delay
from tests.support.wait import eventually

PRICED_THEN_FREE = """
[server]
http = "127.0.0.1:{port}"
unix_socket = ""
state_dir = "{state}"
request_timeout_s = {hold_ttl}

[logging]
format = "json"

[redis]
url = "{redis}"
hold_ttl_s = {hold_ttl}
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[routing]
retries = 0

[budgets]
global = { daily_usd = {budget} }

{keys}

[[tiers]]
name = "paid"
kind = "openai"
base_url = "{paid}"
model = "paid-model"
models = ["m"]
# Only output is priced, so a call's worst case (max_tokens x price) is exact:
# 10 tokens x 10 USD per million = 100 micro-dollars.
price = { input = 0.0, output = 10.0 }

[[tiers]]
name = "free"
kind = "openai"
base_url = "{free}"
model = "free-model"
models = ["m"]
"""

CALL = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CALL_MICROS = 100


def config(redis_url: str, paid: str, free: str, *, budget_calls: int, hold_ttl: float = 60,
           keys: str = "") -> str:
    budget = budget_calls * CALL_MICROS / 1_000_000
    return (PRICED_THEN_FREE.replace("{redis}", redis_url).replace("{paid}", paid)
            .replace("{free}", free).replace("{budget}", repr(budget))
            .replace("{hold_ttl}", str(hold_ttl)).replace("{keys}", keys))


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[FakeUpstream, FakeUpstream]]:
    async with FakeUpstream() as paid, FakeUpstream(reply="free answer") as free:
        yield paid, free


async def post(session: aiohttp.ClientSession, url: str, body: dict, headers: dict | None = None):
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, r.headers.get("x-tiergate-tier"), r.headers.get("Retry-After"), await r.text()


def started(*daemons: SubprocessDaemon) -> None:
    for d in daemons:
        d.start()


async def test_budget_admits_exactly_n_calls_across_two_daemons(tmp_path, redis_url, upstreams):
    paid, free = upstreams
    n = 7
    toml = config(redis_url, paid.base_url, free.base_url, budget_calls=n)
    d1 = SubprocessDaemon(toml, tmp_path, name="d1")
    d2 = SubprocessDaemon(toml, tmp_path, name="d2")
    try:
        await asyncio.to_thread(started, d1, d2)
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(
                *(post(s, (d1 if i % 2 else d2).url, CALL) for i in range(60))
            )
            statuses = [r[0] for r in results]
            tiers = [r[1] for r in results]
            assert statuses == [200] * 60
            assert tiers.count("paid") == n
            assert tiers.count("free") == 60 - n
            assert paid.count("/v1/chat/completions") == n
            # Settled: exactly the budget spent, nothing left held.
            await asyncio.sleep(0.5)
            async with s.get(d1.url + "/admin/usage") as r:
                report = await r.json()
        glob = report["usage"]["day"]["global"]
        assert glob["cost_micros"] == n * CALL_MICROS
        assert glob["held_micros"] == 0
        assert glob["remaining_micros"] == 0
        assert report["usage"]["day"]["tier:paid"]["requests"] == n
        assert report["usage"]["day"]["tier:free"]["requests"] == 60 - n
    finally:
        d1.stop()
        d2.stop()


async def test_budget_exhausted_without_a_free_tier_is_429_naming_the_budget(tmp_path, redis_url, upstreams):
    paid, _ = upstreams
    toml = config(redis_url, paid.base_url, paid.base_url, budget_calls=1)
    toml = toml[: toml.index('[[tiers]]\nname = "free"')]
    d = SubprocessDaemon(toml, tmp_path)
    try:
        await asyncio.to_thread(d.start)
        async with aiohttp.ClientSession() as s:
            first = await post(s, d.url, CALL)
            second = await post(s, d.url, CALL)
        assert first[0] == 200
        assert second[0] == 429
        assert '"budget_exceeded"' in second[3]
        assert "global" in second[3] and "daily" in second[3]
    finally:
        d.stop()


async def test_hold_of_a_killed_daemon_expires_and_the_money_returns(tmp_path, redis_url, upstreams):
    paid, free = upstreams
    paid.push(delay(60))  # the first priced call hangs while the daemon holds its budget
    toml = config(redis_url, paid.base_url, free.base_url, budget_calls=1, hold_ttl=2)
    d1 = SubprocessDaemon(toml, tmp_path, name="d1")
    d2 = SubprocessDaemon(toml, tmp_path, name="d2")
    try:
        await asyncio.to_thread(started, d1, d2)
        async with aiohttp.ClientSession() as s:
            hanging = asyncio.create_task(post(s, d1.url, CALL))
            await eventually(lambda: paid.count("/v1/chat/completions") >= 1, "the priced call")
            # Money is held: another daemon's call must go to the free tier.
            assert (await post(s, d2.url, CALL))[1] == "free"
            await asyncio.to_thread(d1.kill)
            with pytest.raises(aiohttp.ClientError):
                await hanging
            # After the hold's TTL the money is back and the priced tier serves again.
            tier = None
            for _ in range(40):
                await asyncio.sleep(0.25)
                tier = (await post(s, d2.url, CALL))[1]
                if tier == "paid":
                    break
            assert tier == "paid"
    finally:
        d1.stop()
        d2.stop()


async def test_rpm_holds_across_two_daemons(tmp_path, redis_url, upstreams):
    paid, free = upstreams
    key = "tg-test-key-rpm"
    keys = (f'[[keys]]\nname = "alice"\nsha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
            "rpm = 5\n")
    toml = config(redis_url, paid.base_url, free.base_url, budget_calls=100, keys=keys)
    d1 = SubprocessDaemon(toml, tmp_path, name="d1")
    d2 = SubprocessDaemon(toml, tmp_path, name="d2")
    try:
        await asyncio.to_thread(started, d1, d2)
        auth = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as s:
            results = [await post(s, (d1 if i % 2 else d2).url, CALL, auth) for i in range(12)]
            unauth = await post(s, d1.url, CALL)
            wrong = await post(s, d1.url, CALL, {"Authorization": "Bearer nope"})
        statuses = [r[0] for r in results]
        assert statuses.count(200) == 5
        assert statuses.count(429) == 7
        limited = [r for r in results if r[0] == 429]
        assert all(int(r[2]) >= 1 for r in limited)
        assert all('"rate_limit_exceeded"' in r[3] for r in limited)
        assert unauth[0] == 401 and wrong[0] == 401
    finally:
        d1.stop()
        d2.stop()


@pytest.fixture
def durable_redis() -> AsyncIterator[RedisServer]:
    """A redis-server that keeps its data across a restart (append-only file), so that
    'exactly once' can be counted across the outage."""
    workdir = Path(tempfile.mkdtemp(prefix="tiergate-aof-"))
    server = RedisServer(port=free_port(), workdir=workdir)
    server.extra_args = ["--appendonly", "yes", "--appendfsync", "always"]
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_redis_outage_under_load_loses_nothing_and_counts_once(tmp_path, durable_redis, upstreams):
    _, free = upstreams
    toml = config(durable_redis.url, free.base_url, free.base_url, budget_calls=0)
    # Only the free tier: it must keep serving through the outage.
    toml = toml[: toml.index('[[tiers]]\nname = "paid"')] + toml[toml.index('[[tiers]]\nname = "free"'):]
    d = SubprocessDaemon(toml, tmp_path)
    ok = 0
    try:
        await asyncio.to_thread(d.start)
        async with aiohttp.ClientSession() as s:

            async def load(count: int) -> None:
                nonlocal ok
                for _ in range(count):
                    status = (await post(s, d.url, CALL))[0]
                    assert status == 200
                    ok += 1

            await asyncio.gather(*(load(10) for _ in range(4)))
            await asyncio.to_thread(durable_redis.stop)
            await asyncio.gather(*(load(10) for _ in range(4)))  # Redis is down
            async with s.get(d.url + "/readyz") as r:
                assert (await r.json())["ledger"] == "unavailable"
            await asyncio.to_thread(durable_redis.start)
            await asyncio.gather(*(load(10) for _ in range(4)))
            # Replay happens on reconnect; wait for the counts to converge.
            for _ in range(100):
                async with s.get(d.url + "/admin/usage") as r:
                    if r.status == 200:
                        report = await r.json()
                        if report["usage"]["day"].get("tier:free", {}).get("requests", 0) >= ok:
                            break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # anything counted twice would show by now
            async with s.get(d.url + "/admin/usage") as r:
                report = await r.json()
        assert ok == 120
        assert report["usage"]["day"]["tier:free"]["requests"] == 120
        assert report["usage"]["day"]["global"]["requests"] == 120
    finally:
        d.stop()
