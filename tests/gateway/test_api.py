"""The HTTP surface: bad input gets OpenAI-style errors and the daemon keeps serving;
the Unix socket; the official openai client; health endpoints."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess

import openai
import pytest

from tests.gateway.test_routing import CHAT


def assert_openai_error(body: dict, code: str | None = None) -> dict:
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert "code" in err
    if code is not None:
        assert err["code"] == code
    return err


BAD_INPUTS = [
    # (description, request kwargs, status, code)
    ("malformed JSON", {"data": b'{"model": "gpt-test", "messages": [', "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    ("not an object", {"json": ["model"]}, 400, "invalid_json"),
    ("missing messages", {"json": {"model": "gpt-test"}}, 400, "invalid_request"),
    ("empty messages", {"json": {"model": "gpt-test", "messages": []}}, 400, "invalid_request"),
    ("wrong type", {"json": {**CHAT, "temperature": "hot"}}, 400, "invalid_request"),
    ("out of range", {"json": {**CHAT, "temperature": 7}}, 400, "invalid_request"),
    ("bad role", {"json": {"model": "gpt-test", "messages": [{"role": "wizard", "content": "x"}]}}, 400, "invalid_request"),
    ("unknown model", {"json": {**CHAT, "model": "no-such-model"}}, 404, "model_not_found"),
    ("oversize body", {"json": {**CHAT, "messages": [{"role": "user", "content": "x" * 70000}]}}, 413, "request_too_large"),
    ("wrong content type", {"data": json.dumps(CHAT), "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ("form content type", {"data": {"model": "gpt-test"}}, 415, "unsupported_media_type"),
]


async def test_bad_inputs_get_clear_errors_and_the_daemon_keeps_serving(make_daemon, upstreams):
    a, _ = upstreams
    async with make_daemon() as d:
        for what, kwargs, want_status, code in BAD_INPUTS:
            async with d.post("/v1/chat/completions", **kwargs) as r:
                assert r.status == want_status, what
                assert r.headers["x-request-id"]
                err = assert_openai_error(await r.json(), code)
                if want_status == 400 and code == "invalid_request":
                    assert err["param"], what
        async with d.get("/v1/nope") as r:
            assert r.status == 404
            assert_openai_error(await r.json(), "not_found")
        async with d.get("/v1/chat/completions") as r:
            assert r.status == 405
            assert_openai_error(await r.json(), "method_not_allowed")
        # still serving, and nothing bad reached the upstream
        async with d.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
    assert a.count("/v1/chat/completions") == 1


async def test_missing_messages_names_the_parameter(make_daemon):
    async with make_daemon() as d:
        async with d.post("/v1/chat/completions", json={"model": "gpt-test"}) as r:
            err = (await r.json())["error"]
    assert err["param"] == "messages"
    assert "messages" in err["message"]


async def test_request_id_is_echoed_when_given(make_daemon):
    async with make_daemon() as d:
        async with d.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-123"}) as r:
            assert r.headers["x-request-id"] == "abc-123"
            assert (await r.json())["id"] == "chatcmpl-abc-123"


async def test_models_health_and_readiness(make_daemon):
    async with make_daemon() as d:
        async with d.get("/v1/models") as r:
            models = await r.json()
        async with d.get("/healthz") as r:
            assert r.status == 200
        async with d.get("/readyz") as r:
            assert r.status == 200
            ready = await r.json()
    assert [m["id"] for m in models["data"]] == ["gpt-test"]
    assert models["object"] == "list"
    assert ready["ledger"] == "connected"
    assert ready["tiers"]["first"]["ready"] is True


async def test_unix_socket_serves_the_same_api_with_its_mode(make_daemon):
    async with make_daemon() as d:
        mode = stat.S_IMODE(os.stat(d.socket_path).st_mode)
        assert stat.S_ISSOCK(os.stat(d.socket_path).st_mode)
        assert mode == 0o660
        assert d.unix_session is not None
        async with d.unix_session.post("http://localhost/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert r.headers["x-tiergate-tier"] == "first"
    # removed on exit
    assert not d.socket_path.exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_over_the_unix_socket(make_daemon):
    async with make_daemon() as d:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--unix-socket", str(d.socket_path),
            "-H", "Content-Type: application/json", "-d", json.dumps({**CHAT, "stream": True}),
            "http://localhost/v1/chat/completions",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"


async def _raw_exchange(port: int, head: bytes, body: bytes, *, wait_interim: bool) -> tuple[bytes, bytes]:
    """Send ``head``; when ``wait_interim``, read up to the interim answer before sending
    ``body``. Returns (interim, final) as raw bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        interim = b""
        if wait_interim:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(body)
            await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return interim, final
    finally:
        writer.close()


async def test_expect_100_continue_gets_its_interim_answer_before_the_body(make_daemon):
    # curl sends "Expect: 100-continue" with a body over 1 KiB and waits for the interim
    # answer (a second, by default) before sending the body.
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    async with make_daemon() as d:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        interim, final = await _raw_exchange(d.port, head, body, wait_interim=True)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        assert final.startswith(b"HTTP/1.1 200")
        odd = head.replace(b"100-continue", b"something-else")
        _, final = await _raw_exchange(d.port, odd + body, b"", wait_interim=False)
        assert final.startswith(b"HTTP/1.1 417")
        # A body announced over the limit is refused before it is sent: no interim answer.
        limit = d.config.server.max_body_bytes
        huge = head.replace(b"Content-Length: " + str(len(body)).encode(), b"Content-Length: " + str(limit + 1).encode())
        _, final = await _raw_exchange(d.port, huge, b"", wait_interim=False)
        assert final.startswith(b"HTTP/1.1 413"), final
        assert b"x-request-id" in final.lower()


async def test_stale_socket_from_a_crash_is_replaced(make_daemon, tmp_path):
    d = make_daemon()
    # a socket file nobody listens on, as a crashed daemon leaves it
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(d.socket_path))
    s.close()
    assert d.socket_path.exists()
    async with d:
        async with d.unix_session.get("http://localhost/healthz") as r:
            assert r.status == 200


async def test_a_live_socket_is_not_taken_over(make_daemon):
    async with make_daemon() as first:
        second = make_daemon()
        second.socket_path = first.socket_path
        second.config = second.config.model_copy(
            update={"server": second.config.server.model_copy(update={"unix_socket": str(first.socket_path)})}
        )
        from gateway.server import Server

        second.server = Server(second.config, environ={})
        with pytest.raises(OSError, match="in use"):
            await second.server.start()
        await second.server.stop()
        # the first daemon still owns and serves its socket
        async with first.unix_session.get("http://localhost/healthz") as r:
            assert r.status == 200


async def test_official_openai_client_plain_and_streamed(make_daemon):
    async with make_daemon() as d:
        client = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)
        try:
            resp = await client.chat.completions.create(model="gpt-test", messages=CHAT["messages"])
            assert resp.choices[0].message.content.startswith("The quick brown fox")
            assert resp.usage.completion_tokens == 15
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=CHAT["messages"])
            assert raw.headers["x-tiergate-tier"] == "first"
            stream = await client.chat.completions.create(
                model="gpt-test", messages=CHAT["messages"], stream=True,
                stream_options={"include_usage": True})
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage
            assert text.startswith("The quick brown fox")
            assert usage is not None and usage.completion_tokens == 15
            models = await client.models.list()
            assert [m.id for m in models.data] == ["gpt-test"]
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="missing", messages=CHAT["messages"])
        finally:
            await client.close()


async def test_openai_client_sees_a_broken_stream_as_an_error(make_daemon, upstreams):
    from tests.support.upstream import cut_after

    a, _ = upstreams
    a.push(cut_after(2))
    async with make_daemon(failover="error") as d:
        client = openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="gpt-test", messages=CHAT["messages"], stream=True)
            with pytest.raises(openai.APIError, match="mid-stream"):
                async for _ in stream:
                    pass
        finally:
            await client.close()


@pytest.mark.parametrize("which", ["tcp_only", "socket_only"])
async def test_either_listener_can_be_off(make_daemon, which):
    from tests.gateway.conftest import TWO_TIERS

    if which == "tcp_only":
        toml = TWO_TIERS.replace('unix_socket = "{socket}"', 'unix_socket = ""')
    else:
        toml = TWO_TIERS.replace('http = "127.0.0.1:{port}"', 'http = ""')
    d = make_daemon(toml=toml)
    async with d:
        assert d.server.addresses and len(d.server.addresses) == 1
        if which == "tcp_only":
            assert not d.socket_path.exists()
            async with d.post("/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
        else:
            assert d.server.addresses[0].startswith("unix:")
            async with d.unix_session.post("http://localhost/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
