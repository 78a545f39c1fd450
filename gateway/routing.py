"""The small types routing shares: a tier as one generation serves it, what a served
request returns, and the errors that end a walk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.health import TierHealth
from policies.base import TierView
from providers.base import Provider
from providers.config import TierConfig
from providers.schemas import ChatRequest

T = TypeVar("T")


class RoutingError(Exception):
    """No tier served. Carries what the client should see."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type_
        self.headers = headers or {}
        self.attempts = attempts


class StreamBroken(Exception):
    """A stream failed after its first byte reached the client and could not resume."""

    def __init__(self, message: str, *, tier: str) -> None:
        super().__init__(message)
        self.message = message
        self.tier = tier


@dataclass(frozen=True, slots=True)
class Tier:
    """A tier as one generation serves it. Everything here is decided when the
    generation is built; only ``health`` (owned by this generation) changes."""

    name: str
    cfg: TierConfig
    provider: Provider
    health: TierHealth
    position: int  # its place in the TOML file
    # Costs money by the generation's price table: every call needs a budget hold.
    priced: bool
    # From the provider's capabilities: it bounds each call by ``cfg.timeout_s`` itself,
    # and a timed-out call may be tried again.
    self_timed: bool
    retry_timeouts: bool

    @classmethod
    def build(cls, cfg: TierConfig, provider: Provider, health: TierHealth, *, position: int,
              priced: bool) -> Tier:
        caps = provider.capabilities
        return cls(name=cfg.name, cfg=cfg, provider=provider, health=health, position=position,
                   priced=priced, self_timed=caps.self_timed, retry_timeouts=caps.retry_timeouts)

    def view(self) -> TierView:
        """A read-only snapshot for a policy."""
        h = self.health
        circuit_open = h.state == "open"
        return TierView(
            name=self.name,
            kind=self.cfg.kind,
            position=self.position,
            price_input=self.cfg.price.input,
            price_output=self.cfg.price.output,
            healthy=self.provider.ready and not circuit_open,
            circuit_open=circuit_open,
            ttft_ewma_s=h.ttft_ewma_s,
            tpot_ewma_s=h.tpot_ewma_s,
            in_flight=h.in_flight,
        )


@dataclass(slots=True)
class Served(Generic[T]):
    """A whole answer: the result, the tier that gave it, the attempts it took."""

    result: T
    tier: str
    attempts: int


def estimate_prompt_tokens(req: ChatRequest) -> int:
    """An upper bound on the prompt's tokens without a tokenizer: a token of any BPE
    vocabulary covers at least one byte, and each message adds a few template tokens."""
    total = 3
    for m in req.messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif content is not None:
            total += len(json.dumps(content, separators=(",", ":")).encode())
        if m.get("tool_calls"):
            total += len(json.dumps(m["tool_calls"], separators=(",", ":")).encode())
        total += 8
    if req.tools:
        total += len(json.dumps(req.tools, separators=(",", ":")).encode())
    if req.assistant_prefix:
        total += len(req.assistant_prefix.encode())
    return total
