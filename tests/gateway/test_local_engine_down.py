"""Through the daemon: while the local tier's engine thread is dead, requests fail over to
the next tier at once (never after the local tier's 300 s timeout), /readyz says the
engine is down and why, and the tier serves again once the engine restarted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.support.daemon import InProcessDaemon  # noqa: E402
from tests.support.tiny_models import save_tiny_chat_model  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

CONFIG = """
[server]
http = "127.0.0.1:{port}"
unix_socket = ""
state_dir = "{state}"

[redis]
url = "{redis}"

[routing]
retries = 1
backoff_initial_s = 0.01

[[tiers]]
name = "local"
kind = "local"
model = "{model}"
models = ["tiny"]
timeout_s = 300

[[tiers]]
name = "remote"
kind = "openai"
base_url = "{remote}"
model = "upstream"
models = ["tiny"]
"""

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "temperature": 0}


@pytest.fixture
async def daemon(tmp_path: Path, redis_url: str) -> AsyncIterator[InProcessDaemon]:
    model = save_tiny_chat_model(tmp_path / "tiny", "qwen2")
    async with FakeUpstream(reply="The remote tier answers.") as up:
        toml = (CONFIG.replace("{redis}", redis_url).replace("{model}", str(model))
                .replace("{remote}", up.base_url))
        async with InProcessDaemon(toml, tmp_path) as d:
            local = d.server.runtime.generation.providers["local"]
            assert await asyncio.wait_for(local.wait_loaded(), 120), local.load_error
            yield d


async def _chat(d: InProcessDaemon) -> tuple[int, str, dict]:
    async with d.post("/v1/chat/completions", json=CHAT) as r:
        return r.status, r.headers.get("x-tiergate-tier", ""), await r.json()


async def test_a_dead_engine_fails_over_at_once_and_the_tier_comes_back(daemon: InProcessDaemon) -> None:
    d = daemon
    assert (await _chat(d))[:2] == (200, "local")
    engine = d.server.runtime.generation.providers["local"].engine
    engine.supervisor.backoff_initial_s = 2.0  # long enough to watch it down
    died = False

    def kill_once(stage: str) -> None:
        nonlocal died
        if stage == "admit" and not died:
            died = True
            raise RuntimeError("injected engine fault")

    engine.fault_hook = kill_once
    # The request in flight when the thread dies moves on to the remote tier.
    status, tier, body = await asyncio.wait_for(_chat(d), 5)
    assert (status, tier) == (200, "remote"), body
    # Meanwhile: not ready, said on /readyz, and the next request goes straight on.
    async with d.get("/readyz") as r:
        ready = await r.json()
    assert "engine down" in ready["tiers"]["local"]["error"]
    assert "injected engine fault" in ready["tiers"]["local"]["error"]
    assert ready["tiers"]["local"]["ready"] is False
    status, tier, _ = await asyncio.wait_for(_chat(d), 1)
    assert (status, tier) == (200, "remote")
    # The engine restarts on the loaded weights and the local tier serves again.
    for _ in range(100):
        if d.server.runtime.generation.providers["local"].ready:
            break
        await asyncio.sleep(0.1)
    assert (await _chat(d))[:2] == (200, "local")
    async with d.get("/readyz") as r:
        assert "error" not in (await r.json())["tiers"]["local"]
