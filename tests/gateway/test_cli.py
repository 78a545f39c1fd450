"""The command line as an operator uses it: check, serve (as a process), keys."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.gateway.conftest import SECRET, TWO_TIERS
from tests.support.daemon import ROOT, SubprocessDaemon
from tests.support.redis_server import free_port
from tests.support.upstream import FakeUpstream
from tests.support.wait import eventually


def tiergate(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, input=stdin, timeout=60,
    )


def test_check_accepts_the_shipped_config():
    r = tiergate("check", "--config", str(ROOT / "config.toml"))
    assert r.returncode == 0, r.stderr
    assert "local" in r.stdout and "routes:" in r.stdout


def test_check_rejects_a_bad_config_naming_line_and_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nhttp = "127.0.0.1:8080"\n\n'
        '[[tiers]]\nname = "a"\nkind = "openai"\nbase_url = "http://x/v1"\nmodel = "m"\n\n'
        '[[tiers]]\nname = "b"\nkind = "openai"\nbase_url = "http://y/v1"\nmodel = "m"\n'
        'timeout_s = "soon"\n'
    )
    r = tiergate("check", "--config", str(bad))
    assert r.returncode == 2
    assert f"{bad}:15" in r.stderr  # the timeout_s line
    assert "tiers[1].timeout_s" in r.stderr


def test_check_rejects_invalid_toml_and_unknown_keys(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nhttp = 1\n")
    r = tiergate("check", "--config", str(bad))
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    bad.write_text('[server]\nhtpp = "127.0.0.1:1"\n[[tiers]]\nname="a"\nkind="local"\nmodel="x"\n')
    r = tiergate("check", "--config", str(bad))
    assert r.returncode == 2
    assert f"{bad}:2" in r.stderr and "server.htpp" in r.stderr


def test_keys_hash_matches_sha256():
    import hashlib

    r = tiergate("keys", "hash", stdin="tg-some-key\n")
    assert r.returncode == 0
    assert r.stdout.strip() == hashlib.sha256(b"tg-some-key").hexdigest()


def test_refuses_a_public_bind_without_keys(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[server]\nhttp = "0.0.0.0:{free_port()}"\nstate_dir = "{tmp_path}/s"\n'
        '[redis]\nurl = "redis://127.0.0.1:1/0"\n'
        '[[tiers]]\nname="a"\nkind="openai"\nbase_url="http://127.0.0.1:9/v1"\nmodel="m"\n'
    )
    r = tiergate("serve", "--config", str(cfg))
    assert r.returncode == 2
    assert "allow_unauthenticated" in r.stdout + r.stderr


@pytest.fixture
async def served(tmp_path: Path, redis_url: str):
    async with FakeUpstream() as up:
        toml = (TWO_TIERS.replace("{redis}", redis_url).replace("{failover}", "error")
                .replace("{first}", up.base_url).replace("{second}", up.base_url))
        d = SubprocessDaemon(toml, tmp_path, env={"FIRST_KEY": SECRET})
        yield d, up
        d.stop()


async def test_serve_logs_json_lines_without_secrets_and_stops_cleanly(served):
    import asyncio

    d, up = served
    await asyncio.to_thread(d.start)
    body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}).encode()
    req = urllib.request.Request(
        d.url + "/v1/chat/completions", data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
    )
    resp = await asyncio.to_thread(urllib.request.urlopen, req, timeout=10)
    assert resp.status == 200
    assert up.requests[-1].headers["Authorization"] == f"Bearer {SECRET}"
    rc = await asyncio.to_thread(d.stop)
    assert rc == 0
    log = d.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    events = [e["event"] for e in lines]
    assert "listening" in events and "stopped" in events
    access = [e for e in lines if e["event"] == "request" and e["path"] == "/v1/chat/completions"]
    assert access and access[0]["tier"] == "first" and access[0]["status"] == 200
    assert {"request_id", "attempts", "latency_ms", "prompt_tokens", "completion_tokens"} <= set(access[0])
    assert SECRET not in log


async def test_sigterm_drains_in_flight_requests_and_notifies_systemd(tmp_path: Path, redis_url: str):
    import asyncio
    import signal
    import socket as socketlib

    from tests.support.upstream import delay

    notify_path = tmp_path / "notify.sock"
    notify = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    async with FakeUpstream() as up:
        up.push(delay(1.5))
        toml = (TWO_TIERS.replace("{redis}", redis_url).replace("{failover}", "error")
                .replace("{first}", up.base_url).replace("{second}", up.base_url))
        d = SubprocessDaemon(toml, tmp_path, env={"FIRST_KEY": SECRET, "NOTIFY_SOCKET": str(notify_path)})
        try:
            await asyncio.to_thread(d.start)
            body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).encode()
            req = urllib.request.Request(d.url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            in_flight = asyncio.create_task(asyncio.to_thread(urllib.request.urlopen, req, timeout=20))
            await eventually(lambda: up.count("/v1/chat/completions") >= 1, "the upstream call")
            d.signal(signal.SIGTERM)
            resp = await in_flight
            assert resp.status == 200  # finished although SIGTERM came while it was in flight
            assert json.loads(resp.read())["choices"][0]["message"]["content"]
            rc = await asyncio.to_thread(d.process.wait, 30)
            assert rc == 0
            messages = []
            while True:
                try:
                    messages.append(notify.recv(4096).decode())
                except BlockingIOError:
                    break
            assert any(m.startswith("READY=1") for m in messages)
            assert "STOPPING=1" in messages
        finally:
            d.stop()
            notify.close()


async def test_sighup_does_not_kill_the_daemon(served):
    import asyncio
    import signal

    d, _ = served
    await asyncio.to_thread(d.start)
    d.signal(signal.SIGHUP)
    await asyncio.sleep(0.3)
    assert d.process.poll() is None
    assert await asyncio.to_thread(d.is_ready)
    assert await asyncio.to_thread(d.stop) == 0
    assert "reload_unsupported" in d.log()
