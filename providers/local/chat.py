"""The local chat tier: a causal LM in this process, behind the Provider seam.

Lifecycle: ``start()`` begins loading the model on a thread and returns at once;
``ready`` turns true when it is loaded, ``load_error`` holds the reason when it failed.
A request before that raises ``CapacityError`` (status 503): the router fails over at
once instead of waiting for a load that may take a minute or never finish.

Errors a request can get:

- ``FatalError`` 400 ``context_length_exceeded``: the prompt alone fills the context;
- ``FatalError`` 400 ``unsupported_parameter`` (``param`` names it): ``logprobs``,
  ``logit_bias``, a ``response_format`` other than text, ``tool_choice`` "required" or
  naming a function, ``n`` above the batch size;
- ``CapacityError``: not loaded yet, load failed, the queue is full, out of memory.

Sampling parameters a request leaves out take the model's generation config (the
transformers convention): a model without one decodes greedily. ``temperature = 0`` is
greedy. ``max_tokens`` defaults to the tier's ``max_output_tokens`` and is capped at
what is left of the context (finish "length").
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog

from providers.base import Capabilities, ProviderStatus
from providers.errors import CapacityError, FatalError, ProviderError
from providers.local.config import LocalTierConfig
from providers.local.detok import IncrementalDetokenizer, StopMatcher
from providers.local.engine import Engine, EngineEvent
from providers.local.lifecycle import BackgroundLoad
from providers.local.sampling import SamplingParams
from providers.local.tools import ToolCallStream
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

log = structlog.get_logger(__name__)


@dataclass
class _Choice:
    index: int
    detok: IncrementalDetokenizer
    stops: StopMatcher
    tools: ToolCallStream | None
    seq_id: int = 0
    tokens: int = 0
    finish: str | None = None
    started: bool = False
    text: list[str] = field(default_factory=list)


class LocalChatProvider(BackgroundLoad):
    """A chat tier served by an in-process model and a batching engine."""

    kind = "local"

    def __init__(self, cfg: LocalTierConfig) -> None:
        super().__init__(cfg)
        self.capabilities = Capabilities(
            chat=True, stream=True, embeddings=False, tools=True, resume=True, retry_timeouts=False
        )
        self.model_name = cfg.model
        self.gguf_cache_hit: bool | None = None
        self.max_context = 0
        self._loaded: Any = None
        self._engine: Engine | None = None
        self._prompts: Any = None
        # Prompt rendering and tokenising: off the event loop, one at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tiergate-tok-{cfg.name}")

    # --- lifecycle -------------------------------------------------------------------

    def _load_blocking(self) -> tuple[Any, Engine]:
        from providers.local.engines import load_chat_engine
        from providers.local.prompt import PromptBuilder

        loaded, engine = load_chat_engine(self.cfg)
        self.gguf_cache_hit = loaded.gguf_cache_hit
        self.max_context = loaded.max_context
        self._prompts = PromptBuilder(loaded.tokenizer, tier=self.name)
        engine.start()
        return loaded, engine

    def _loaded_ok(self, result: tuple[Any, Engine]) -> None:
        self._loaded, self._engine = result

    @property
    def ready(self) -> bool:
        return self._engine is not None and self._engine.down_reason is None

    @property
    def engine_down(self) -> str | None:
        """Why a loaded tier's engine takes no work now (it died and awaits its restart,
        say); None while it serves or before it is loaded."""
        return self._engine.down_reason if self._engine is not None else None

    @property
    def engine(self) -> Engine | None:
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self._loaded.tokenizer if self._loaded is not None else None

    def status(self) -> ProviderStatus:
        engine = self._engine
        if engine is None:
            return super().status()
        down = engine.down_reason
        return ProviderStatus(ready=down is None, error=f"engine down: {down}" if down else None,
                              active=engine.active, waiting=engine.waiting)

    async def probe(self) -> Health:
        if self._engine is None:
            return Health(ok=False, detail=self.load_error or "loading")
        down = self._engine.down_reason
        if down is not None:
            return Health(ok=False, detail=f"engine down: {down}")
        return Health(ok=True, detail=f"{self._engine.active} active, {self._engine.waiting} waiting")

    async def aclose(self) -> None:
        await self._finish_loading()
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)
        self._loaded = None
        self._executor.shutdown(wait=False)

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        raise FatalError(f"tier {self.name} serves chat, not embeddings", tier=self.name,
                         status=400, code="unsupported_task", param="model")

    # --- requests ---------------------------------------------------------------------

    async def chat(self, req: ChatRequest) -> ChatResult:
        choices: dict[int, _Choice] = {}
        prompt_tokens = 0
        async for kind, index, payload in self._generate(req, choices):
            if kind == "prompt":
                prompt_tokens = payload
        out = []
        for index in sorted(choices):
            c = choices[index]
            calls = c.tools.calls if c.tools is not None else []
            message: dict[str, Any] = {"role": "assistant", "content": "".join(c.text) or None}
            if calls:
                message["tool_calls"] = calls
            elif message["content"] is None:
                message["content"] = ""
            out.append(ChatChoice(index=index, message=message, finish_reason=c.finish))
        completion = sum(c.tokens for c in choices.values())
        return ChatResult(choices=tuple(out), usage=Usage(prompt_tokens, completion),
                          model=self.model_name)

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Chunks: a role chunk per choice, content or tool-call deltas, a finish chunk
        per choice, then one usage chunk. Closing the iterator cancels the sequences."""
        choices: dict[int, _Choice] = {}
        prompt_tokens = 0
        call_counts: dict[int, int] = {}
        model = self.model_name
        async for kind, index, payload in self._generate(req, choices):
            if kind == "prompt":
                prompt_tokens = payload
            elif kind == "start":
                yield ChatChunk(choices=(ChunkChoice(index, {"role": "assistant", "content": ""}),), model=model)
            elif kind == "content":
                yield ChatChunk(choices=(ChunkChoice(index, {"content": payload}),), model=model)
            elif kind == "tool_call":
                position = call_counts.get(index, 0)
                call_counts[index] = position + 1
                delta = {"tool_calls": [{"index": position, **payload}]}
                yield ChatChunk(choices=(ChunkChoice(index, delta),), model=model)
            elif kind == "finish":
                yield ChatChunk(choices=(ChunkChoice(index, {}, finish_reason=payload),), model=model)
        completion = sum(c.tokens for c in choices.values())
        yield ChatChunk(usage=Usage(prompt_tokens, completion), model=model)

    async def _generate(
        self, req: ChatRequest, choices: dict[int, _Choice]
    ) -> AsyncIterator[tuple[str, int, Any]]:
        """The shared core: ("prompt", -1, n), then per choice ("start", i, None),
        ("content", i, text), ("tool_call", i, call), ("finish", i, reason)."""
        engine = self._engine
        if engine is None:
            raise CapacityError(
                f"tier {self.name} is not ready: {self.load_error or 'the model is still loading'}",
                tier=self.name, status=503,
            )
        self._validate(req)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        loop = asyncio.get_running_loop()
        prompt_ids = await loop.run_in_executor(self._executor, self._prompt_ids, req, use_tools)
        budget = self.max_context - len(prompt_ids)
        if budget <= 0:
            raise FatalError(
                f"This model's maximum context length is {self.max_context} tokens, but the "
                f"prompt has {len(prompt_ids)} tokens. Shorten the messages.",
                tier=self.name, status=400, code="context_length_exceeded", param="messages",
            )
        yield "prompt", -1, len(prompt_ids)
        base = self._sampling(req, budget)
        queue: asyncio.Queue[tuple[int, EngineEvent]] = asyncio.Queue()
        tokenizer = self._loaded.tokenizer
        for i in range(req.n):
            choices[i] = _Choice(
                index=i,
                detok=IncrementalDetokenizer(tokenizer),
                stops=StopMatcher(req.stop),
                tools=ToolCallStream() if use_tools else None,
            )
        open_ids: set[int] = set()
        try:
            for i in range(req.n):
                params = base
                if req.n > 1 and base.seed is not None:
                    params = dataclasses.replace(base, seed=base.seed + i)
                seq_id = engine.submit(prompt_ids, params, _sink(queue, i), loop)
                choices[i].seq_id = seq_id
                open_ids.add(seq_id)
            remaining = req.n
            while remaining:
                index, event = await queue.get()
                c = choices[index]
                if c.finish is not None:
                    continue
                if event.error is not None:
                    raise _as_provider_error(event.error, self.name)
                if not c.started:
                    c.started = True
                    yield "start", index, None
                for item in self._absorb(c, event):
                    yield item
                if c.finish is not None:
                    open_ids.discard(c.seq_id)
                    if event.finish_reason is None:  # a stop string: end it in the engine
                        engine.cancel(c.seq_id)
                    remaining -= 1
        finally:
            for seq_id in open_ids:
                engine.cancel(seq_id)

    def _absorb(self, c: _Choice, event: EngineEvent) -> list[tuple[str, int, Any]]:
        out: list[tuple[str, int, Any]] = []
        text = ""
        if event.token_ids:
            c.tokens += len(event.token_ids)
            text = c.detok.push(event.token_ids)
        finished = event.finish_reason is not None
        if finished:
            text += c.detok.flush()
        sendable = c.stops.feed(text)
        if c.stops.stopped:
            finished = True
        elif finished:
            sendable += c.stops.flush()
        pieces: list[tuple[str, Any]] = [("content", sendable)] if sendable else []
        if c.tools is not None:
            pieces = c.tools.feed(sendable) if sendable else []
            if finished:
                pieces += c.tools.finish()
        for kind, payload in pieces:
            if kind == "content":
                if payload:
                    c.text.append(payload)
                    out.append(("content", c.index, payload))
            else:
                out.append(("tool_call", c.index, payload))
        if finished:
            if c.tools is not None and c.tools.calls:
                c.finish = "tool_calls"
            elif c.stops.stopped:
                c.finish = "stop"
            else:
                c.finish = event.finish_reason or "stop"
            out.append(("finish", c.index, c.finish))
        return out

    def _prompt_ids(self, req: ChatRequest, use_tools: bool) -> list[int]:
        text = self._prompts.render(
            req.messages, tools=req.tools if use_tools else None,
            assistant_prefix=req.assistant_prefix,
        )
        return self._prompts.encode(text)

    def _validate(self, req: ChatRequest) -> None:
        body = req.body or {}

        def refuse(param: str, why: str) -> FatalError:
            return FatalError(f"tier {self.name} cannot honour {param!r}: {why}", tier=self.name,
                              status=400, code="unsupported_parameter", param=param)

        if body.get("logprobs") or body.get("top_logprobs"):
            raise refuse("logprobs", "log probabilities are not returned by the local engine")
        if body.get("logit_bias"):
            raise refuse("logit_bias", "the local engine has no logit bias")
        fmt = req.response_format or body.get("response_format")
        if fmt and fmt.get("type", "text") != "text":
            raise refuse("response_format", "constrained (JSON) decoding is not supported")
        choice = req.tool_choice
        if choice not in (None, "auto", "none"):
            raise refuse("tool_choice", "only 'auto' and 'none' can be honoured (no forced calls)")
        if req.n < 1 or req.n > self.cfg.max_batch:
            raise refuse("n", f"n must be between 1 and {self.cfg.max_batch} on this tier")
        if req.top_k is not None and req.top_k < 0:
            raise refuse("top_k", "top_k must be >= 0")
        if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
            raise refuse("top_p", "top_p must be in (0, 1]")
        if req.temperature is not None and req.temperature < 0:
            raise refuse("temperature", "temperature must be >= 0")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise refuse("max_tokens", "max_tokens must be >= 1")

    def _sampling(self, req: ChatRequest, budget: int) -> SamplingParams:
        defaults = self._loaded.generation_defaults
        sampled_by_default = defaults.get("do_sample", False)
        temperature = req.temperature
        if temperature is None:
            temperature = float(defaults.get("temperature") or 1.0) if sampled_by_default else 0.0
        top_p = req.top_p
        if top_p is None:
            top_p = float(defaults.get("top_p") or 1.0) if sampled_by_default else 1.0
        top_k = req.top_k
        if top_k is None:
            top_k = int(defaults.get("top_k") or 0) if sampled_by_default else 0
        asked = self.cfg.max_output_tokens if req.max_tokens is None else req.max_tokens
        max_new = min(asked, budget)
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            seed=req.seed,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
        )


def _sink(queue: asyncio.Queue[tuple[int, EngineEvent]], index: int) -> Any:
    def put(event: EngineEvent) -> None:
        queue.put_nowait((index, event))

    return put


def _as_provider_error(error: BaseException, tier: str) -> ProviderError:
    if isinstance(error, ProviderError):
        return error
    return CapacityError(f"tier {tier}: {error}", tier=tier, status=503)
