"""The plain values the gateway and the ledger hand each other."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from tracking.keyspace import WindowKind


# Fast path: docs/BENCHMARKS.md "ids from a per-process prefix and a counter".
class _Ids:
    """Unique ids without a system call each: 64 random bits drawn once per process (and
    again in a forked child), then a counter; 32 hex digits, a uuid4's length."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


new_event_id = _Ids().new


@dataclass(frozen=True, slots=True)
class Scopes:
    """Who a call is counted against: the tier, the model it ran, the key (by name)."""

    tier: str
    model: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """Hold ``amount_micros`` (the worst case) before calling ``tier``."""

    tier: str
    model: str
    key: str | None
    amount_micros: int


@dataclass(frozen=True, slots=True)
class Hold:
    """Money held for one call; settle it with ``commit`` or give it back with ``release``.

    ``budgets`` lists the (scope, window) pairs it is held in; empty when no budget
    applies or the ledger was unavailable and fail_open let the call through.
    """

    id: str
    tier: str
    model: str
    key: str | None
    amount_micros: int
    day: str
    month: str
    budgets: tuple[tuple[str, WindowKind], ...] = ()


@dataclass(frozen=True, slots=True)
class Refusal:
    """A hold was refused: which budget (scope, window) had too little left, in words."""

    scope: str  # "global", "tier:openai", "key:alice", or "ledger" when Redis is unavailable
    window: WindowKind | Literal[""]
    message: str
    tier: str
    code: Literal["budget_exhausted", "ledger_unavailable"] = "budget_exhausted"


@dataclass(frozen=True, slots=True)
class RateLimited:
    """The key is over a rate limit; try again after ``retry_after_s``."""

    limit: Literal["rpm", "tpm"]
    retry_after_s: float
    key: str

    @property
    def message(self) -> str:
        what = "requests" if self.limit == "rpm" else "tokens"
        return (
            f"Rate limit reached for key '{self.key}' ({what} per minute). "
            f"Try again in {self.retry_after_s:.1f}s."
        )


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to ``Ledger.admit``: at most one of the three is set."""

    rate_limited: RateLimited | None = None
    hold: Hold | None = None
    refusal: Refusal | None = None

    @property
    def admitted(self) -> bool:
        return self.rate_limited is None


# Fast path: docs/BENCHMARKS.md "request and usage types not frozen".
@dataclass(slots=True)  # a value, never changed; not frozen: one is built per request
class UsageEvent:
    """One tier call's outcome. ``error=True`` counts it under ``errors``, not ``requests``.

    ``id`` makes it count once however often it is replayed. ``admitted_tokens`` is the
    estimate ``admit`` charged to the key's tokens-per-minute; when given, commit corrects
    that charge to the actual tokens.
    """

    tier: str
    model: str
    key: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0
    error: bool = False
    ts: float = field(default_factory=time.time)
    id: str = field(default_factory=new_event_id)
    admitted_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tier": self.tier,
            "model": self.model,
            "key": self.key,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_micros": self.cost_micros,
            "error": self.error,
            "ts": self.ts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageEvent:
        return cls(
            id=str(data["id"]),
            tier=str(data["tier"]),
            model=str(data["model"]),
            key=data.get("key"),
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            cost_micros=int(data["cost_micros"]),
            error=bool(data["error"]),
            ts=float(data["ts"]),
        )


class LedgerUnavailableError(ConnectionError):
    """Redis cannot be reached and what was asked needs it (a report, say).

    A builtin ``ConnectionError``, so callers need not know redis-py's exceptions.
    """
