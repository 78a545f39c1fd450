"""A tier behind any OpenAI-compatible API: OpenAI, vLLM, Ollama, LM Studio, llama.cpp.

The client's body goes upstream as it came (fields the gateway does not know are kept),
with ``model`` set to the tier's model. Streams always ask the upstream for the final
usage chunk (``stream_options.include_usage``) so that the ledger settles on real
numbers; the gateway decides whether the client sees it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal, TypeVar

import aiohttp
import orjson
import structlog
from pydantic import model_validator
from yarl import URL

from providers.base import Capabilities, ProviderStatus
from providers.config import RemoteTierConfig
from providers.errors import CapacityError, ProviderError, RetryableError
from providers.http import (
    TRANSPORT_ERRORS,
    auth_headers,
    create_session,
    error_from_payload,
    read_error_payload,
    transport_error,
)
from providers.schemas import (
    ChatChoice,
    ChatChunk,
    ChatRequest,
    ChatResult,
    ChunkChoice,
    EmbeddingRequest,
    EmbeddingResult,
    Health,
    Usage,
)
from providers.sse import iter_openai_payloads, stream_error

log = structlog.get_logger(__name__)
T = TypeVar("T")

PROBE_TIMEOUT_S = 5.0
# Fast path: docs/BENCHMARKS.md "remote tier's session defaults" (and the parsed chat URL).
# Every request body this tier sends is JSON: the session sends the header by default.
JSON_HEADERS = {"Content-Type": "application/json"}
# A tier model of "auto" or "*" sends the client's model name upstream unchanged.
PASS_THROUGH_MODELS = frozenset({"auto", "*"})


class OpenAITierConfig(RemoteTierConfig):
    """``kind = "openai"``: any OpenAI-compatible API; ``base_url`` is its root."""

    kind: Literal["openai"] = "openai"

    @model_validator(mode="after")
    def _needs_base_url(self) -> OpenAITierConfig:
        if not self.base_url:
            raise ValueError(f"tier {self.name!r}: kind 'openai' needs base_url")
        return self


def usage_from(raw: Any) -> Usage | None:
    """An upstream ``usage`` object as ``Usage``, or None when there is none."""
    if not isinstance(raw, dict):  # decoded JSON: an object is a dict
        return None
    return Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))


def body_from_fields(req: ChatRequest) -> dict[str, Any]:
    """An upstream body from the typed fields, for a request built without a wire body."""
    fields: dict[str, Any] = {
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "n": req.n if req.n != 1 else None,
        "stop": list(req.stop) or None,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "tools": req.tools,
        "tool_choice": req.tool_choice,
        "response_format": req.response_format,
        "user": req.user,
    }
    return {k: v for k, v in fields.items() if v is not None}


class OpenAICompatProvider:
    """``kind = "openai"``: chat, streams, embeddings and a probe over one pooled session.

    Resuming a broken stream (``req.assistant_prefix``, only when ``cfg.can_resume``):
    the text produced so far is appended as a final ``{"role": "assistant"}`` message and
    the body carries vLLM's ``continue_final_message: true`` and
    ``add_generation_prompt: false``, so the upstream continues that message instead of
    starting a new one. Upstreams without those extensions must not set ``can_resume``.
    """

    kind = "openai"

    def __init__(self, cfg: RemoteTierConfig, api_key: str | None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._api_key = api_key
        self.api_root = self._api_root(cfg)
        # Parsed once: aiohttp would parse a string URL on every call (see JSON_HEADERS).
        self._chat_url = URL(self.url("chat/completions"))
        self.capabilities = Capabilities(
            chat=cfg.task == "chat",
            stream=cfg.task == "chat",
            embeddings=cfg.task == "embeddings",
            resume=cfg.can_resume,
            self_timed=True,  # the session's ClientTimeout(total=timeout_s)
        )
        self._session: aiohttp.ClientSession | None = None
        self._usage_missing_logged = False
        # The model name sent upstream; None passes the client's through.
        self._fixed_model = None if cfg.model in PASS_THROUGH_MODELS else cfg.model

    def _api_root(self, cfg: RemoteTierConfig) -> str:
        return (cfg.base_url or "").rstrip("/")

    def url(self, path: str) -> str:
        return f"{self.api_root}/{path}"

    # lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            headers = {**JSON_HEADERS, **auth_headers(self.cfg, self._api_key)}
            self._session = create_session(self.cfg, headers)
            log.info("tier_started", tier=self.name, kind=self.kind, api_root=self.api_root)

    @property
    def ready(self) -> bool:
        # Only aclose() closes the session, and it drops it: no need to ask aiohttp.
        return self._session is not None

    def status(self) -> ProviderStatus:
        return ProviderStatus(ready=self.ready)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # requests ----------------------------------------------------------------------

    def upstream_model(self, requested: str) -> str:
        return self._fixed_model or requested

    def chat_body(self, req: ChatRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON sent upstream for ``req``."""
        # A shallow copy: the client's body is plain JSON already; only top-level keys
        # and the messages list are replaced here, never mutated in place.
        body = dict(req.body) if req.body else body_from_fields(req)
        body["model"] = self.upstream_model(req.model)
        # A tuple serialises as a JSON array: no list copy needed.
        messages = req.messages or tuple(body.get("messages", ()))
        if req.assistant_prefix:
            if not self.cfg.can_resume:
                raise CapacityError("tier cannot continue an assistant message", tier=self.name)
            messages = (*messages, {"role": "assistant", "content": req.assistant_prefix})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        body["messages"] = messages
        if req.max_tokens is not None:
            # The effective cap (the gateway may have lowered or set it for a budget
            # hold) goes in whichever field the client used.
            fields = [f for f in ("max_tokens", "max_completion_tokens") if f in body] or ["max_tokens"]
            for name in fields:
                body[name] = req.max_tokens
        body["stream"] = stream
        if stream:
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        else:
            body.pop("stream_options", None)
        return body

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        json: Any = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A successful upstream response; failures raise typed errors.

        Transport failures inside the ``async with`` body (a read that breaks) are mapped
        too, so callers see only ``ProviderError``s.
        """
        if self._session is None:
            raise RetryableError("tier not started", tier=self.name)
        try:
            data = orjson.dumps(json) if json is not None else None
            async with self._session.request(method, url, data=data, timeout=timeout) as resp:
                await self._raise_for_status(resp)
                yield resp
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, tier=self.name, secret=self._api_key) from exc

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status >= 400:
            payload = await read_error_payload(resp, tier=self.name)
            raise self.upstream_error(resp.status, resp.headers, payload)

    def upstream_error(self, status: int, headers: Mapping[str, str], payload: Any) -> ProviderError:
        """The typed error for a failed upstream answer; tiers add their own cases."""
        return error_from_payload(status, headers, payload, tier=self.name, secret=self._api_key)

    async def post_json(self, url: str | URL, body: Any, parse: Callable[[Any], T] | None = None) -> Any:
        """POST ``body`` and return the decoded JSON answer, or ``parse(answer)``.

        The same as ``request`` then ``read``, written out: this is every non-streamed
        call's path, and the context-manager generator costs more than the rest here.
        ``parse`` lets a caller return this coroutine as its own instead of awaiting it
        in another (every coroutine in the chain is passed through on each resume).
        """
        # Fast path: docs/BENCHMARKS.md "remote tier's call written out".
        session = self._session
        if session is None:
            raise RetryableError("tier not started", tier=self.name)
        try:
            async with session.post(url, data=orjson.dumps(body)) as resp:
                if resp.status >= 400:  # checked here first: no coroutine on the usual path
                    await self._raise_for_status(resp)
                raw = await resp.read()
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, tier=self.name, secret=self._api_key) from exc
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RetryableError("upstream answered with invalid JSON", tier=self.name) from None
        if type(payload) is dict and payload.get("error") is not None:
            raise stream_error(payload, tier=self.name, secret=self._api_key)
        return payload if parse is None else parse(payload)

    def chat(self, req: ChatRequest) -> Awaitable[ChatResult]:
        return self.post_json(self._chat_url, self.chat_body(req, stream=False), self._chat_result)

    def _chat_result(self, payload: Any) -> ChatResult:
        raw_choices = payload.get("choices") if type(payload) is dict else None
        if not raw_choices or type(raw_choices) is not list:
            raise RetryableError("upstream answered with no choices", tier=self.name)
        choices = []
        for i, c in enumerate(raw_choices):
            if type(c) is not dict:
                raise RetryableError("upstream answered with a malformed choice", tier=self.name)
            choices.append(ChatChoice(index=c.get("index", i), message=c.get("message") or {},
                                      finish_reason=c.get("finish_reason"), logprobs=c.get("logprobs")))
        usage = usage_from(payload.get("usage"))
        if usage is None:
            self._note_usage_missing()
            usage = Usage()
        return ChatResult(
            choices=tuple(choices),
            usage=usage,
            model=payload.get("model") or "",
            system_fingerprint=payload.get("system_fingerprint"),
        )

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Chunks as the upstream sends them; a usage-only chunk comes last.

        Closing this generator (``aclose``, or the consuming task being cancelled) closes
        the upstream connection, so the upstream sees the client leave and stops.
        """
        body = self.chat_body(req, stream=True)
        async with self.request("POST", self._chat_url, json=body) as resp:
            finished = False
            try:
                async for payload in iter_openai_payloads(
                    resp.content.iter_any(), tier=self.name, secret=self._api_key
                ):
                    chunk = chunk_from(payload)
                    if chunk is not None:
                        yield chunk
                finished = True
            finally:
                if not finished:
                    resp.close()

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        body: dict[str, Any] = {
            "model": self.upstream_model(req.model),
            "input": list(req.inputs),
            "encoding_format": "float",
        }
        if req.dimensions is not None:
            body["dimensions"] = req.dimensions
        if req.user is not None:
            body["user"] = req.user
        payload = await self.post_json(self.url("embeddings"), body)
        return self.openai_embeddings(payload, expected=len(req.inputs))

    def openai_embeddings(self, payload: Any, *, expected: int) -> EmbeddingResult:
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list) or len(data) != expected:
            raise RetryableError("upstream answered with malformed embeddings", tier=self.name)
        ordered = sorted(data, key=lambda item: item.get("index", 0))
        usage = usage_from(payload.get("usage")) or Usage(0, 0)
        return EmbeddingResult(
            vectors=[item["embedding"] for item in ordered],
            usage=Usage(usage.prompt_tokens, 0),
            model=payload.get("model") or "",
        )

    async def probe(self) -> Health:
        """GET ``/models`` with a short timeout; never raises."""
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=min(PROBE_TIMEOUT_S, self.cfg.timeout_s))
        try:
            async with self.request("GET", self.url("models"), timeout=timeout) as resp:
                await resp.read()
                status = resp.status
        except ProviderError as exc:
            return Health(False, exc.message, time.monotonic() - started)
        return Health(True, f"http {status}", time.monotonic() - started)

    def _note_usage_missing(self) -> None:
        if not self._usage_missing_logged:
            self._usage_missing_logged = True
            log.warning("upstream_usage_missing", tier=self.name)


def chunk_from(payload: Mapping[str, Any]) -> ChatChunk | None:
    """One stream payload as a ``ChatChunk``; None for a payload that carries nothing.

    Usage on a chunk that also has choices stays on it (some servers report running
    usage on every chunk); the last usage seen is the total.
    """
    choices = tuple(
        ChunkChoice(
            index=c.get("index", 0),
            delta=c.get("delta") or {},
            finish_reason=c.get("finish_reason"),
            logprobs=c.get("logprobs"),
        )
        for c in payload.get("choices") or ()
    )
    usage = usage_from(payload.get("usage"))
    if not choices and usage is None:
        return None
    return ChatChunk(choices=choices, usage=usage, model=payload.get("model") or "")
