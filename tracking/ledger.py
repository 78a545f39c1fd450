"""The shared ledger: rate limits, budget holds and usage counters in Redis.

Every daemon that points at the same Redis shares one truth. The hot path costs at most
one round trip before a tier call (``admit`` or ``reserve``) and one after (``commit``),
or none at all: usage with no hold in Redis is batched (``record``).

``Ledger`` is a small facade over the parts, each one concept:

- ``tracking.connection``: the pool, the scripts, connected or not, reconnecting;
- ``tracking.admission``: rate limits and holds before a call;
- ``tracking.usage``: counting usage after it, batched when nothing is held;
- ``tracking.replay``: the journal for what Redis could not take, and its replay;
- ``tracking.report``: usage against budget, read back.

The gateway sees it through ``tracking.base.UsageLedger``; the key layout is
``tracking.keyspace``'s, the scripts' arguments ``tracking.marshal``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tracking.admission import Admissions
from tracking.config import BudgetsConfig, RedisConfig
from tracking.connection import REDIS_FAILED, LedgerConnection, LedgerState
from tracking.journal import Journal
from tracking.keys import ApiKey, KeyStore
from tracking.keyspace import KeySpace
from tracking.pricing import PriceTable
from tracking.records import Admission, Hold, HoldRequest, LedgerUnavailableError, Refusal, Scopes, UsageEvent
from tracking.replay import Backlog
from tracking.report import BudgetLimitsByScope, build_report
from tracking.terms import LedgerTerms
from tracking.usage import UsageBatcher

__all__ = ["Ledger", "LedgerState"]


class Ledger:
    def __init__(
        self,
        config: RedisConfig,
        budgets: BudgetsConfig,
        prices: PriceTable,
        keys: KeyStore,
        journal_path: Path,
    ) -> None:
        self.config = config
        self.space = KeySpace(config.key_prefix)
        terms = LedgerTerms.of(budgets, prices, keys)
        self._connection = LedgerConnection(config, on_connected=self._replay)
        self._backlog = Backlog(Journal(journal_path), self._connection, self.space, config)
        self._admissions = Admissions(self._connection, self.space, config, terms)
        self._usage = UsageBatcher(self._connection, self._backlog, self.space, config, terms)
        self._terms = terms

    # -- configuration ----------------------------------------------------------------

    def reconfigure(self, *, budgets: BudgetsConfig, prices: PriceTable, keys: KeyStore) -> None:
        """Swap budgets, prices and keys (a new generation); open holds keep their scopes."""
        terms = self._terms = LedgerTerms.of(budgets, prices, keys)
        self._admissions.terms = terms
        self._usage.terms = terms

    @property
    def prices(self) -> PriceTable:
        return self._terms.prices

    @property
    def keys(self) -> KeyStore:
        return self._terms.keys

    @property
    def budget_limits(self) -> BudgetLimitsByScope:
        return self._terms.budget_limits

    # -- state --------------------------------------------------------------------------

    @property
    def state(self) -> LedgerState:
        return self._connection.state

    @property
    def replaying(self) -> bool:
        """True while journaled usage is being replayed into Redis (for /readyz)."""
        return self._backlog.replaying

    @property
    def journal(self) -> Journal:
        return self._backlog.journal

    @property
    def journaled_events(self) -> int:
        return self._backlog.journaled_events

    @property
    def lost_events(self) -> int:
        return self._backlog.lost_events

    async def start(self) -> None:
        """Connect and replay any journal left behind. Never raises for a Redis that is down."""
        await self._connection.start()

    async def _replay(self) -> None:
        await self._backlog.replay()

    async def aclose(self) -> None:
        """Send the pending usage batch, stop reconnecting, flush the journal, close the pool."""
        self._connection.stop_reconnecting()
        await self._usage.aclose()
        await self._connection.aclose()
        await self._backlog.flush()

    # -- before a call ------------------------------------------------------------------

    async def admit(self, *, key: ApiKey | None, tokens: int, hold: HoldRequest | None) -> Admission:
        """Check the key's rate limits and hold the first tier's worst case, in one round
        trip. With no key limits and nothing to hold, Redis is not called at all."""
        return await self._admissions.admit(key=key, tokens=tokens, hold=hold)

    async def reserve(self, req: HoldRequest) -> Hold | Refusal:
        """Hold a later tier's worst case (fallback), all budgets or none."""
        return await self._admissions.reserve(req)

    async def release(self, hold: Hold) -> None:
        """Give a hold back unspent (call cancelled before it cost anything)."""
        await self._admissions.release(hold)

    # -- after a call -------------------------------------------------------------------

    def record(self, event: UsageEvent) -> None:
        """Count a call that has no hold in Redis (a free tier, no budget), once, soon.

        Neither blocks nor needs awaiting: the event joins the pending batch, which goes
        to Redis within ``tracking.usage.RECORD_WINDOW_S`` as one script call, or to the
        journal if Redis cannot take it. ``aclose`` sends what is pending. Needs a
        running event loop.
        """
        self._usage.record(event)

    async def commit(self, hold: Hold | None, event: UsageEvent) -> None:
        """Settle ``hold`` (if any) to the event's actual cost and count the event, once.

        If Redis cannot take it, the event goes to the journal and is replayed later;
        the hold, if it was in Redis, returns when its TTL passes. With no hold in Redis
        to settle this is ``record`` that returns once the event's batch is in Redis or
        the journal (such a batch goes within a couple of milliseconds).
        """
        await self._usage.commit(hold, event)

    async def record_error(self, scopes: Scopes, hold: Hold | None = None) -> None:
        """Count a failed call (and release its hold): a commit of an error event."""
        await self.commit(hold, UsageEvent(tier=scopes.tier, model=scopes.model, key=scopes.key, error=True))

    async def flush(self) -> None:
        """Return once the usage recorded so far is in Redis or the journal (now, not
        after the batch window)."""
        await self._usage.flush()

    # -- reports ------------------------------------------------------------------------

    async def report(self, *, day: str | None = None, month: str | None = None) -> dict[str, Any]:
        """Usage against budget per scope and window, as JSON-able data (reads Redis)."""
        connection = self._connection
        if connection.redis is None or not connection.connected:
            raise LedgerUnavailableError("the usage ledger (Redis) is unavailable")
        try:
            report = await build_report(connection.redis, self.space, self.budget_limits, day=day, month=month)
        except REDIS_FAILED as exc:
            connection.down(exc)
            raise LedgerUnavailableError(f"the usage ledger (Redis) failed: {exc}") from exc
        report["ledger"] = connection.state
        return report
