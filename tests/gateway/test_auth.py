"""API keys at the edge: 401 on TCP without a valid key, the trusted Unix socket, admin
endpoints, per-key model and tier allowances; and the usage report from the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json

from tests.gateway.conftest import TWO_TIERS
from tests.gateway.test_cli import tiergate
from tests.gateway.test_routing import CHAT

USER_KEY = "tg-user-key-0123456789"
ADMIN_KEY = "tg-admin-key-0123456789"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = f"""
[[keys]]
name = "user"
sha256 = "{sha(USER_KEY)}"
tiers = ["second"]

[[keys]]
name = "ops"
sha256 = "{sha(ADMIN_KEY)}"
admin = true
"""

WITH_KEYS = TWO_TIERS.replace("[[tiers]]", KEYS + "\n[[tiers]]", 1)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_tcp_needs_a_valid_key_and_the_socket_is_trusted(make_daemon):
    async with make_daemon(toml=WITH_KEYS) as d:
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "missing_api_key"
        async with d.post("/v1/chat/completions", json=CHAT, headers=bearer("tg-wrong")) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        async with d.post("/v1/chat/completions", json=CHAT, headers=bearer(USER_KEY)) as r:
            assert r.status == 200
            # this key may only use the second tier
            assert r.headers["x-tiergate-tier"] == "second"
        async with d.unix_session.post("http://localhost/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "first"
        # health endpoints need no key (for load balancers and systemd checks)
        async with d.get("/readyz") as r:
            assert r.status == 200


async def test_admin_endpoints_need_an_admin_key(make_daemon):
    async with make_daemon(toml=WITH_KEYS) as d:
        async with d.get("/admin/usage", headers=bearer(USER_KEY)) as r:
            assert r.status == 403
        async with d.get("/admin/usage", headers=bearer(ADMIN_KEY)) as r:
            assert r.status == 200
            assert "usage" in await r.json()
        async with d.get("/admin/usage?day=not-a-day", headers=bearer(ADMIN_KEY)) as r:
            assert r.status == 400


async def test_a_key_limited_to_models_is_refused_others(make_daemon):
    toml = WITH_KEYS.replace('tiers = ["second"]', 'models = ["other-model"]')
    async with make_daemon(toml=toml) as d:
        async with d.post("/v1/chat/completions", json=CHAT, headers=bearer(USER_KEY)) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "model_not_allowed"
        async with d.get("/v1/models", headers=bearer(USER_KEY)) as r:
            assert (await r.json())["data"] == []


async def test_usage_cli_reads_the_shared_ledger(make_daemon, tmp_path):
    async with make_daemon() as d:
        for _ in range(3):
            async with d.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
        await d.server.runtime.background.drain(5)
        await d.server.runtime.ledger.flush()
        cfg = tmp_path / "cli.toml"
        cfg.write_text(d.toml)
        table = await asyncio.to_thread(tiergate, "usage", "--config", str(cfg))
        as_json = await asyncio.to_thread(tiergate, "usage", "--json", "--config", str(cfg))
    assert table.returncode == 0, table.stderr
    assert "tier:first" in table.stdout
    report = json.loads(as_json.stdout)
    assert report["usage"]["day"]["tier:first"]["requests"] == 3
    assert report["usage"]["day"]["global"]["completion_tokens"] == 45
