"""A fake OpenAI-compatible upstream on loopback that misbehaves on cue.

A real aiohttp server (``AppRunner`` + ``TCPSite`` on a free port) speaking the OpenAI
wire format, for provider tests, the gateway's end-to-end tests and benchmarks.

Routes
    POST /v1/chat/completions   JSON, or SSE when ``"stream": true``
    POST /v1/embeddings         OpenAI embeddings (also what TEI serves)
    GET  /v1/models             the model list (probes)
    POST /hf-inference/models/{model}/pipeline/feature-extraction
                                Hugging Face router style: ``{"inputs": [...]}`` -> vectors

Use
    async with FakeUpstream() as up:          # or: up = FakeUpstream(); await up.start()
        up.base_url                           # "http://127.0.0.1:PORT/v1"
        up.root                               # "http://127.0.0.1:PORT" (TGI-style base)
        up.push(status(500), rate_limited(2), ok())   # one behaviour per request, FIFO
        up.default = ok()                     # what answers once the queue is empty
        ...
        up.requests[-1].json["model"]; up.requests[-1].headers.get("Authorization")
        up.count("/v1/chat/completions")
        await up.wait_disconnects(1)          # a client left mid-response

Behaviours (module functions, each a frozen ``Behaviour``)
    ok(reply=None, token_delay_s=0)    answer normally
    delay(seconds, then=ok())          wait before answering
    status(code, body=None, headers=None)   answer ``code`` with a JSON body (any status,
                                       200 included: the body is sent as it is)
    rate_limited(retry_after=1, header="Retry-After")   429 with that header
    hf_loading(estimated_time=20)      503 {"error": "... is currently loading", "estimated_time"}
    cut_after(k)                       stream k content chunks, then abort the TCP
                                       connection (no [DONE]); non-stream: abort at once
    stall_after(k, seconds)            stream k content chunks, then stall, then go on
    stall_before_first(seconds)        send headers, then nothing for ``seconds``
    raw_stream(*pieces)                send these SSE bytes (or str) as separate writes, as is

Answers are deterministic. The reply (``FakeUpstream(reply=...)``, default ``REPLY``) is
split into tokens at whitespace (``"a b c"`` -> ``"a"``, ``" b"``, ``" c"``);
``max_tokens`` / ``max_completion_tokens`` truncate it (``finish_reason`` "length").
``usage.prompt_tokens`` is the number of whitespace-separated words in the messages'
text, ``completion_tokens`` the number of tokens sent. Streams carry the usage chunk when
``stream_options.include_usage`` is true. A request with ``continue_final_message`` and
a final assistant message that is a prefix of the reply gets the rest of the reply.
Embedding vectors come from ``vector_for(text, dims)`` (8 dimensions unless asked).

``disconnects`` counts responses whose client went away before the response was done
(the handler is cancelled on connection loss); a ``cut_after`` abort is not counted.

As a process, for benchmarks and manual checks (no recording; zero-delay answers are
precomputed and cached)::

    python -m tests.support.upstream --port 8001 [--delay-ms 0] [--token-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import re
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

REPLY = "The quick brown fox jumps over the lazy dog and then rests in the shade."
DEFAULT_DIMS = 8
_TOKEN = re.compile(r"\s*\S+")


# behaviours -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the upstream answers one request. Build these with the functions below."""

    status: int = 200
    body: Any = None  # sent as JSON as it is (for any status) when set
    headers: Mapping[str, str] = field(default_factory=dict)
    reply: str | None = None
    delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    stall_after: int | None = None
    stall_s: float = 0.0
    cut_after: int | None = None
    raw_sse: tuple[bytes, ...] | None = None

    @property
    def instant(self) -> bool:
        return (
            self.delay_s == 0
            and self.first_token_delay_s == 0
            and self.token_delay_s == 0
            and self.stall_after is None
            and self.cut_after is None
        )


def ok(reply: str | None = None, *, token_delay_s: float = 0.0) -> Behaviour:
    return Behaviour(reply=reply, token_delay_s=token_delay_s)


def delay(seconds: float, then: Behaviour | None = None) -> Behaviour:
    return dataclasses.replace(then or ok(), delay_s=seconds)


def status(code: int, body: Any = None, headers: Mapping[str, str] | None = None) -> Behaviour:
    if body is None:
        kind = "server_error" if code >= 500 else "invalid_request_error"
        body = {"error": {"message": f"fake upstream status {code}", "type": kind, "param": None, "code": None}}
    return Behaviour(status=code, body=body, headers=dict(headers or {}))


def rate_limited(retry_after: float | str = 1, *, header: str = "Retry-After") -> Behaviour:
    value = str(retry_after)
    if header.lower() == "retry-after" and isinstance(retry_after, float) and retry_after.is_integer():
        value = str(int(retry_after))
    body = {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    return status(429, body, {header: value})


def hf_loading(estimated_time: float = 20.0, model: str = "the model") -> Behaviour:
    return status(503, {"error": f"Model {model} is currently loading", "estimated_time": estimated_time})


def cut_after(k: int) -> Behaviour:
    return Behaviour(cut_after=k)


def stall_after(k: int, seconds: float) -> Behaviour:
    return Behaviour(stall_after=k, stall_s=seconds)


def stall_before_first(seconds: float) -> Behaviour:
    return Behaviour(first_token_delay_s=seconds)


def raw_stream(*pieces: bytes | str) -> Behaviour:
    return Behaviour(raw_sse=tuple(p.encode() if isinstance(p, str) else p for p in pieces))


# deterministic content ------------------------------------------------------------------


def tokens_of(text: str) -> list[str]:
    return _TOKEN.findall(text)


def message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(len(message_text(m).split()) for m in messages)


def vector_for(text: str, dims: int = DEFAULT_DIMS) -> list[float]:
    """The fake embedding of ``text``: deterministic, values in [0, 1]."""
    digest = b""
    counter = 0
    while len(digest) < dims:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    return [b / 255 for b in digest[:dims]]


@dataclass(frozen=True, slots=True)
class Completion:
    model: str
    tokens: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int
    n: int = 1

    @property
    def usage(self) -> dict[str, int]:
        done = len(self.tokens) * self.n
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}

    def json_body(self) -> bytes:
        text = "".join(self.tokens)
        return json.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": self.model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": self.finish_reason, "logprobs": None}
                    for i in range(self.n)
                ],
                "usage": self.usage,
            }
        ).encode()

    def frames(self, include_usage: bool) -> list[bytes]:
        """The SSE frames after the role frame: one per token, the finish, usage, [DONE]."""
        out = [self._frame({"role": "assistant", "content": ""}, None, include_usage)]
        out += [self._frame({"content": t}, None, include_usage) for t in self.tokens]
        out.append(self._frame({}, self.finish_reason, include_usage))
        if include_usage:
            usage_chunk = {**self._head(), "choices": [], "usage": self.usage}
            out.append(b"data: " + json.dumps(usage_chunk).encode() + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out

    def _head(self) -> dict[str, Any]:
        return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": self.model}

    def _frame(self, delta: dict[str, Any], finish: str | None, include_usage: bool) -> bytes:
        chunk: dict[str, Any] = {**self._head(), "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            chunk["usage"] = None
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class Recorded:
    method: str
    path: str
    headers: CIMultiDictProxy[str]  # case-insensitive: headers.get("authorization")
    json: Any


# the server -----------------------------------------------------------------------------

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_CACHE_LIMIT = 4096


class _Cut(Exception):
    """The fake aborted the connection on purpose (not a client disconnect)."""


class FakeUpstream:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        reply: str = REPLY,
        models: Sequence[str] = ("fake-model",),
        default: Behaviour | None = None,
        record: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.reply = reply
        self.models = tuple(models)
        self.default = default or ok()
        self.models_behaviour: Behaviour = ok()  # /v1/models never takes from the queue
        self.record = record
        self.requests: list[Recorded] = []
        self.disconnects = 0
        self._queue: deque[Behaviour] = deque()
        self._changed = asyncio.Event()
        self._cache: dict[tuple[Any, ...], Any] = {}
        self._runner: web.AppRunner | None = None

    # lifecycle

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._watch], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post(r"/hf-inference/models/{model:.+}/pipeline/feature-extraction", self._feature_extraction)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # cues and observations

    def push(self, *behaviours: Behaviour) -> None:
        """Queue behaviours; each answers one chat / embeddings request, in order."""
        self._queue.extend(behaviours)

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r.path == path)

    async def wait_disconnects(self, n: int = 1, timeout_s: float = 10.0) -> int:
        """Wait until at least ``n`` client disconnects were seen (a safety bound only)."""
        async with asyncio.timeout(timeout_s):
            while self.disconnects < n:
                self._changed.clear()
                await self._changed.wait()
        return self.disconnects

    def _next(self) -> Behaviour:
        return self._queue.popleft() if self._queue else self.default

    async def _receive(self, request: web.Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if self.record:
            self.requests.append(Recorded(request.method, request.path, CIMultiDictProxy(CIMultiDict(request.headers)), body))
        return body

    @web.middleware
    async def _watch(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Cut:
            raise asyncio.CancelledError() from None
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            self._changed.set()
            raise

    # handlers

    async def _canned(self, cue: Behaviour) -> web.StreamResponse | None:
        """The start every cue shares: its delay, then its canned status and body if any."""
        if cue.delay_s:
            await asyncio.sleep(cue.delay_s)
        if cue.body is not None:
            return web.json_response(cue.body, status=cue.status, headers=cue.headers)
        return None

    async def _whole_answer_cue(self, request: web.Request, cue: Behaviour) -> web.StreamResponse | None:
        """A cue for an answer sent in one piece: stalls add up, a cut aborts at once."""
        canned = await self._canned(cue)
        if canned is not None:
            return canned
        if cue.cut_after is not None:
            self._abort(request)
        wait = cue.first_token_delay_s + (cue.stall_s if cue.stall_after is not None else 0.0)
        if wait:
            await asyncio.sleep(wait)
        return None

    async def _receive_cued(self, request: web.Request) -> tuple[Any, web.StreamResponse | None]:
        body = await self._receive(request)
        return body, await self._whole_answer_cue(request, self._next())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._receive(request)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response(
                {"error": {"message": "messages is required", "type": "invalid_request_error", "param": "messages", "code": None}},
                status=400,
            )
        cue = self._next()
        if body.get("stream"):
            return await self._stream(request, body, cue)
        canned = await self._whole_answer_cue(request, cue)
        if canned is not None:
            return canned
        payload = self._cached(("json", *self._key(body, cue)), lambda: self._completion(body, cue).json_body())
        return web.Response(body=payload, content_type="application/json")

    async def _stream(self, request: web.Request, body: dict[str, Any], cue: Behaviour) -> web.StreamResponse:
        canned = await self._canned(cue)
        if canned is not None:
            return canned
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if cue.raw_sse is None and cue.instant:
            key = ("sse", include_usage, *self._key(body, cue))
            payload = self._cached(key, lambda: b"".join(self._completion(body, cue).frames(include_usage)))
            return web.Response(body=payload, headers=_SSE_HEADERS)
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        if cue.first_token_delay_s:
            await asyncio.sleep(cue.first_token_delay_s)
        if cue.raw_sse is not None:
            for piece in cue.raw_sse:
                await resp.write(piece)
                await asyncio.sleep(0)
            await resp.write_eof()
            return resp
        frames = self._completion(body, cue).frames(include_usage)
        # frames[0] is the role frame; frames[1 : 1 + len(tokens)] carry the content.
        for i, frame in enumerate(frames):
            sent_tokens = i - 1
            if cue.cut_after is not None and sent_tokens == cue.cut_after:
                self._abort(request)
            if cue.stall_after is not None and sent_tokens == cue.stall_after:
                await asyncio.sleep(cue.stall_s)
            elif cue.token_delay_s and i > 0:
                await asyncio.sleep(cue.token_delay_s)
            await resp.write(frame)
        await resp.write_eof()
        return resp

    def _abort(self, request: web.Request) -> None:
        if request.transport is not None:
            request.transport.abort()
        raise _Cut()

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, canned = await self._receive_cued(request)
        if canned is not None:
            return canned
        raw = (body or {}).get("input", [])
        inputs = [raw] if isinstance(raw, str) else list(raw)
        dims = (body or {}).get("dimensions") or DEFAULT_DIMS
        words = sum(len(str(t).split()) for t in inputs)
        return web.json_response(
            {
                "object": "list",
                "model": (body or {}).get("model", ""),
                "data": [{"object": "embedding", "index": i, "embedding": vector_for(str(t), dims)} for i, t in enumerate(inputs)],
                "usage": {"prompt_tokens": words, "total_tokens": words},
            }
        )

    async def _feature_extraction(self, request: web.Request) -> web.StreamResponse:
        body, canned = await self._receive_cued(request)
        if canned is not None:
            return canned
        raw = (body or {}).get("inputs")
        if isinstance(raw, str):
            return web.json_response(vector_for(raw))
        if not isinstance(raw, list):
            return web.json_response({"error": "inputs is required"}, status=400)
        return web.json_response([vector_for(str(t)) for t in raw])

    async def _models(self, request: web.Request) -> web.StreamResponse:
        await self._receive(request)
        canned = await self._whole_answer_cue(request, self.models_behaviour)
        if canned is not None:
            return canned
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]}
        )

    # content

    def _key(self, body: Mapping[str, Any], cue: Behaviour) -> tuple[Any, ...]:
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        return (
            body.get("model", ""),
            prompt_tokens(messages),
            body.get("max_completion_tokens") or body.get("max_tokens"),
            body.get("n") or 1,
            cue.reply or self.reply,
            message_text(last) if body.get("continue_final_message") and last.get("role") == "assistant" else None,
        )

    def _cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            value = self._cache[key] = build()
        return value

    def _completion(self, body: Mapping[str, Any], cue: Behaviour) -> Completion:
        return self._cached(("completion", *self._key(body, cue)), lambda: self._build_completion(body, cue))

    def _build_completion(self, body: Mapping[str, Any], cue: Behaviour) -> Completion:
        model, prompt, max_tokens, n, reply, prefix = self._key(body, cue)
        if prefix is not None and reply.startswith(prefix):
            reply = reply[len(prefix) :]
        tokens = tokens_of(reply)
        finish = "stop"
        if max_tokens is not None and len(tokens) > int(max_tokens):
            tokens, finish = tokens[: int(max_tokens)], "length"
        return Completion(model=model, tokens=tuple(tokens), finish_reason=finish, prompt_tokens=prompt, n=int(n))


# as a process -----------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    default = ok(token_delay_s=args.token_delay_ms / 1000)
    if args.delay_ms:
        default = delay(args.delay_ms / 1000, default)
    upstream = FakeUpstream(host=args.host, port=args.port, reply=args.reply, default=default, record=False)
    await upstream.start()
    print(f"fake upstream at {upstream.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await upstream.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait before every answer")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="wait between streamed tokens")
    parser.add_argument("--reply", default=REPLY)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
