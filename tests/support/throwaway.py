"""A throwaway provider kind and throwaway policies, written as a user adds them: the
kind is this module's config model and provider plus one line in
``providers.registry.KINDS`` (the tests add it with ``monkeypatch.setitem``); a policy
is a class named in TOML as ``"tests.support.throwaway:LastFirst"``, or one line in
``policies.registry.POLICIES``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Literal

from policies.base import TierView
from providers.base import Capabilities, ProviderStatus
from providers.config import TierConfig
from providers.errors import FatalError
from providers.registry import ProviderKind
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


class EchoTierConfig(TierConfig):
    """``kind = "echo"``: answers every chat with ``reply``, after ``delay_s``."""

    kind: Literal["echo"] = "echo"
    reply: str = "echo"
    delay_s: float = 0.0
    # Whether a call that timed out may be tried again (a capability of the kind).
    retry_timeouts: bool = True


class EchoProvider:
    kind = "echo"

    def __init__(self, cfg: EchoTierConfig, api_key: str | None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.capabilities = Capabilities(retry_timeouts=cfg.retry_timeouts)
        self.calls = 0
        self.started = False

    async def start(self) -> None:
        self.started = True

    @property
    def ready(self) -> bool:
        return self.started

    def status(self) -> ProviderStatus:
        return ProviderStatus(ready=self.ready, error=None if self.started else "not started")

    async def chat(self, req: ChatRequest) -> ChatResult:
        self.calls += 1
        await asyncio.sleep(self.cfg.delay_s)
        message = {"role": "assistant", "content": self.cfg.reply}
        return ChatResult(choices=(ChatChoice(index=0, message=message, finish_reason="stop"),),
                          usage=Usage(prompt_tokens=3, completion_tokens=1), model=self.cfg.model)

    async def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        self.calls += 1
        await asyncio.sleep(self.cfg.delay_s)
        for word in self.cfg.reply.split(" "):
            yield ChatChunk(choices=(ChunkChoice(index=0, delta={"content": word}),))
        yield ChatChunk(choices=(ChunkChoice(index=0, delta={}, finish_reason="stop"),))

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        raise FatalError("echo tiers do not embed", tier=self.name)

    async def probe(self) -> Health:
        return Health(ok=self.ready)

    async def aclose(self) -> None:
        self.started = False


# The one registry line: KINDS["echo"] = ECHO_KIND.
ECHO_KIND = ProviderKind(EchoTierConfig, EchoProvider)


class LastFirst:
    """The tiers in reverse file order: a static order."""

    name = "last_first"
    static_order = True

    def rank(self, request: ChatRequest, tiers: Sequence[TierView]) -> list[str]:
        return [t.name for t in sorted(tiers, key=lambda t: -t.position)]


class CheapestFirst:
    """By price, file order among equals; keeps the views it was shown."""

    name = "cheapest"
    static_order = False

    def __init__(self) -> None:
        self.seen: list[TierView] = []

    def rank(self, request: ChatRequest, tiers: Sequence[TierView]) -> list[str]:
        self.seen = list(tiers)
        return [t.name for t in sorted(tiers, key=lambda t: (t.price_input + t.price_output, t.position))]


class Broken:
    """A policy that cannot start."""

    name = "broken"

    def __init__(self) -> None:
        raise RuntimeError("no config for me")

    def rank(self, request: ChatRequest, tiers: Sequence[TierView]) -> list[str]:
        return []


class NotAPolicy:
    name = "nothing"
