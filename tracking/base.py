"""The ledger seam: what the router asks of the ledger, and nothing more.

``tracking.Ledger`` (Redis, with a journal while Redis is away) is the implementation;
the gateway's attempts and walk see only this protocol.
"""

from __future__ import annotations

from typing import Protocol

from tracking.keys import ApiKey
from tracking.records import Admission, Hold, HoldRequest, Refusal, UsageEvent


class UsageLedger(Protocol):
    async def admit(self, *, key: ApiKey | None, tokens: int, hold: HoldRequest | None) -> Admission:
        """The key's rate limits and the first tier's hold, all or nothing, at once."""

    async def reserve(self, req: HoldRequest) -> Hold | Refusal:
        """Hold a later tier's worst case in every budget that applies, or refuse."""

    async def commit(self, hold: Hold | None, event: UsageEvent) -> None:
        """Settle ``hold`` to the event's actual cost and count the event, once."""

    def record(self, event: UsageEvent) -> None:
        """Count an event that has no hold in Redis, soon, without waiting."""

    async def release(self, hold: Hold) -> None:
        """Give a hold back unspent."""
