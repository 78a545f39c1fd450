"""The small types routing shares: a tier as the router holds it, what a served request
returns, what one request's walk over the tiers noted, and the errors that end it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.health import TierHealth
from providers.base import Provider
from providers.config import TierConfig
from providers.schemas import ChatRequest
from tracking import Refusal

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


@dataclass
class Tier:
    cfg: TierConfig
    provider: Provider
    health: TierHealth
    position: int
    # Set by the router: the tier costs money (calls need a budget hold), and whether
    # its provider bounds each call by ``cfg.timeout_s`` itself.
    priced: bool = False
    name: str = field(init=False)
    self_timed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.cfg.name
        self.self_timed = self.provider.capabilities.self_timed


@dataclass
class Served(Generic[T]):
    result: T
    tier: str
    attempts: int


class Trail:
    """What happened while routing one request, for the error message and the log.
    (A plain class: one is made per request, and a dataclass's default factories cost
    more than the rest of it.)"""

    __slots__ = ("attempts", "failures", "refusals", "admitted_tokens")

    def __init__(self) -> None:
        self.attempts = 0
        self.failures: list[str] = []
        self.refusals: list[Refusal] = []
        # Tokens admit() charged to the key's tokens-per-minute; the first settle
        # corrects it.
        self.admitted_tokens: int | None = None

    def take_admitted(self) -> int | None:
        tokens, self.admitted_tokens = self.admitted_tokens, None
        return tokens


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
