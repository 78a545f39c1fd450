"""The Policy seam: order the tiers that may serve one request.

Policies are pure and synchronous: they read ``TierView``s (read-only snapshots) and
return tier names, best first. No I/O, no clocks, no mutation: easy to test and to
write for a user ("package.module:Class" in TOML, see ``policies.registry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from providers.schemas import ChatRequest


@dataclass(frozen=True, slots=True)
class TierView:
    name: str
    kind: str
    position: int  # order in the TOML file
    price_input: float  # USD per million tokens
    price_output: float
    healthy: bool = True
    circuit_open: bool = False
    ttft_ewma_s: float | None = None  # time to first token
    tpot_ewma_s: float | None = None  # time per output token
    in_flight: int = 0
    budget_headroom_usd: float | None = None  # None: no budget applies


class Policy(Protocol):
    name: str
    # True when ``rank`` reads only what a tier's config fixes (name, kind, position,
    # price), never the request or live state, and ranks a subset of tiers in the order
    # it ranks them all: the router then ranks each model's tiers once and keeps the
    # order. A policy without the attribute is taken as live (False).
    static_order: bool

    def rank(self, request: ChatRequest, tiers: Sequence[TierView]) -> list[str]:
        """Tier names in the order to try them; a tier left out is not tried."""
