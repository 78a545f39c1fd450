"""Before a call: the key's rate limits and the budget hold, in one round trip.

``admit`` runs ``admit.lua`` for the key's rpm/tpm and the first tier's worst case in
every budget that applies (global, the tier's, the key's; day and month), all or
nothing; ``reserve`` holds a later tier's (fallback); ``release`` gives a hold back.
With nothing limited and nothing to hold, Redis is not called at all.

While Redis is unavailable rate limits are not enforced and free tiers get a hold that
lives nowhere but here; priced tiers are refused (``fail_closed``) or served without a
budget check (``fail_open``). A timed-out ``admit`` may have held money in Redis; that
hold returns when its TTL passes.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from tracking.config import RedisConfig
from tracking.connection import REDIS_FAILED, LedgerConnection
from tracking.keys import ApiKey
from tracking.keyspace import KeySpace, WindowKind, day_of, global_scope, key_scope, month_of, tier_scope
from tracking.marshal import Budget, admit_call, hold_keys
from tracking.records import Admission, Hold, HoldRequest, RateLimited, Refusal, new_event_id
from tracking.terms import LedgerTerms

log = structlog.get_logger(__name__)

_WINDOW_WORD = {"day": "daily", "month": "monthly"}


def _scope_label(scope: str) -> str:
    kind, _, name = scope.partition(":")
    return f"{kind} '{name}'" if name else scope


def _hold_for(req: HoldRequest, hold_id: str, day: str, month: str,
              budgets: tuple[tuple[str, WindowKind], ...] = ()) -> Hold:
    return Hold(id=hold_id, tier=req.tier, model=req.model, key=req.key,
                amount_micros=req.amount_micros, day=day, month=month, budgets=budgets)


class Admissions:
    def __init__(self, connection: LedgerConnection, space: KeySpace, config: RedisConfig,
                 terms: LedgerTerms) -> None:
        self._connection = connection
        self._space = space
        self._config = config
        self.terms = terms

    def _applicable(self, req: HoldRequest) -> list[Budget]:
        """(scope, window, limit) of every budget this hold must fit in."""
        scopes = [global_scope(), tier_scope(req.tier)]
        if req.key is not None:
            scopes.append(key_scope(req.key))
        limits = self.terms.budget_limits
        return [(scope, kind, limit) for scope in scopes for kind, limit in limits.get(scope, {}).items()]

    def _needs_ledger(self, req: HoldRequest) -> bool:
        return req.amount_micros > 0 or self.terms.prices.is_priced(req.tier)

    async def admit(self, *, key: ApiKey | None, tokens: int, hold: HoldRequest | None) -> Admission:
        """Check the key's rate limits and hold the first tier's worst case, in one round trip."""
        now = time.time()
        day, month = day_of(now), month_of(now)
        limited = key is not None and key.has_rate_limits
        budgets = self._applicable(hold) if hold is not None and self._needs_ledger(hold) else []
        hold_id = new_event_id()

        connection = self._connection
        ledger_ok = connection.connected
        if ledger_ok and (limited or budgets):
            assert connection.scripts is not None
            keys, args = admit_call(self._space, self._config, key if limited else None, tokens,
                                    hold, hold_id, budgets, day, month)
            try:
                reply = await connection.scripts.admit(keys=keys, args=args)
            except REDIS_FAILED as exc:
                connection.down(exc)
                ledger_ok = False
            else:
                return self._admission(reply, key, hold, hold_id, budgets, day, month)
        if hold is None:
            return Admission()
        local = self._hold_without_redis(hold, hold_id, day, month, ledger_ok=ledger_ok)
        if isinstance(local, Refusal):
            return Admission(refusal=local)
        return Admission(hold=local)

    async def reserve(self, req: HoldRequest) -> Hold | Refusal:
        """Hold a later tier's worst case (fallback), all budgets or none."""
        admission = await self.admit(key=None, tokens=0, hold=req)
        if admission.refusal is not None:
            return admission.refusal
        assert admission.hold is not None
        return admission.hold

    async def release(self, hold: Hold) -> None:
        """Give a hold back unspent (call cancelled before it cost anything)."""
        connection = self._connection
        if not hold.budgets or not connection.connected:
            return
        assert connection.scripts is not None
        try:
            await connection.scripts.release(keys=hold_keys(self._space, hold), args=[hold.id])
        except REDIS_FAILED as exc:
            # The hold returns by itself when its TTL passes.
            connection.down(exc)

    def _admission(self, reply: list[Any], key: ApiKey | None, hold: HoldRequest | None, hold_id: str,
                   budgets: list[Budget], day: str, month: str) -> Admission:
        status = int(reply[0])
        if status == 1:
            assert key is not None
            limit = "rpm" if reply[1] in (b"rpm", "rpm") else "tpm"
            limited = RateLimited(limit=limit, retry_after_s=int(reply[2]) / 1000, key=key.name)
            log.info("rate_limited", key=key.name, limit=limit, retry_after_s=limited.retry_after_s)
            return Admission(rate_limited=limited)
        if hold is None:
            return Admission()
        if status == 2:
            scope, kind, limit = budgets[int(reply[1]) - 1]
            return Admission(refusal=self._refusal(hold, scope, kind, limit, int(reply[2]), int(reply[3])))
        held_in = tuple((scope, kind) for scope, kind, _ in budgets)
        return Admission(hold=_hold_for(hold, hold_id, day, month, held_in))

    def _refusal(self, hold: HoldRequest, scope: str, kind: WindowKind, limit: int, spent: int,
                 held: int) -> Refusal:
        log.info("budget_refused", tier=hold.tier, key=hold.key, scope=scope, window=kind,
                 limit_micros=limit, spent_micros=spent, held_micros=held,
                 amount_micros=hold.amount_micros)
        message = (
            f"The {_WINDOW_WORD[kind]} budget of {_scope_label(scope)} "
            f"(${limit / 1_000_000:.2f}) is exhausted: ${spent / 1_000_000:.4f} spent, "
            f"${held / 1_000_000:.4f} held by calls in flight, and this call to tier "
            f"'{hold.tier}' may cost up to ${hold.amount_micros / 1_000_000:.4f}."
        )
        return Refusal(scope=scope, window=kind, message=message, tier=hold.tier)

    def _hold_without_redis(self, hold: HoldRequest, hold_id: str, day: str, month: str, *,
                            ledger_ok: bool) -> Hold | Refusal:
        """A hold that lives nowhere but here: free tier, no budget, or Redis unavailable."""
        priced = self._needs_ledger(hold)
        if priced and not ledger_ok and self._config.on_unavailable == "fail_closed":
            log.info("budget_refused", tier=hold.tier, key=hold.key, scope="ledger", reason="ledger_unavailable")
            return Refusal(
                scope="ledger",
                window="",
                message=(
                    f"Tier '{hold.tier}' is priced and the usage ledger is unavailable; "
                    "priced tiers are refused until it returns."
                ),
                tier=hold.tier,
                code="ledger_unavailable",
            )
        return _hold_for(hold, hold_id, day, month)
