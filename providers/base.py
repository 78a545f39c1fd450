"""The Provider seam: one tier of inference, local or remote.

A provider is constructed from its tier's config (its kind's ``TierConfig`` model) and
its API key (nothing global), started once (``start``: open pools, load a model off the
event loop), then asked to ``chat``, ``stream``, ``embed`` and ``probe`` until
``aclose``. ``status`` says how it is (for /readyz, later metrics); ``capabilities``
what it can do, which is all the router asks of a kind.

Errors are typed (``providers.errors``): ``RetryableError``, ``CapacityError``,
``FatalError``. The router owns retries, deadlines and first-token / inter-token
timeouts; a provider only maps what it sees to those types.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from providers.schemas import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    Health,
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    chat: bool = True
    stream: bool = True
    embeddings: bool = False
    tools: bool = True
    # Can continue a final assistant message (ChatRequest.assistant_prefix): lets the
    # router's stream_failover = "resume" land on this tier.
    resume: bool = False
    # Every call ends within the tier's ``timeout_s`` on its own (a remote tier's HTTP
    # session carries that timeout): the router adds no timer of its own unless the
    # request's deadline is nearer.
    self_timed: bool = False
    # A call that ran out of time may succeed if tried again (an API that was slow for
    # a moment). False where the same work would run out of time again (a local
    # generation): the router fails over at once instead of retrying.
    retry_timeouts: bool = True


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """How a provider is, as it reports it (never guessed from its attributes)."""

    ready: bool
    error: str | None = None  # why it is not ready (a failed load, say)
    active: int | None = None  # sequences being generated now (an in-process engine)
    waiting: int | None = None  # sequences queued behind them


class Provider(Protocol):
    name: str
    kind: str
    capabilities: Capabilities

    async def start(self) -> None:
        """Open pools, load weights. Runs once; blocking work goes off the event loop."""

    @property
    def ready(self) -> bool:
        """True once the tier can serve (a local model is loaded, say)."""

    async def chat(self, req: ChatRequest) -> ChatResult:
        """One whole completion."""

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Stream a completion. Closing the iterator cancels the upstream work."""

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        """Embed ``req.inputs``."""

    async def probe(self) -> Health:
        """A cheap liveness check, for health checks and /readyz."""

    def status(self) -> ProviderStatus:
        """Readiness, the reason when not ready, and the load it carries; cheap."""

    async def aclose(self) -> None:
        """Release sessions, threads and memory."""
