"""The shared ledger: rate limits, budget holds and usage counters in Redis.

Every daemon that points at the same Redis shares one truth. The hot path costs at most
one round trip before a tier call (``admit`` or ``reserve``: one Lua script for the key's
rate limits and the budget hold in every applicable scope and window, all or nothing)
and one after (``commit``: one Lua script that settles the hold and counts the usage).
Usage with no hold in Redis (free tiers, no budget) costs less still: ``record`` adds
the event to a batch and returns; every 10 ms (or 256 events) one Lua script counts
the whole batch, summed per usage hash (``commit_batch.lua``). The key layout is
documented in ``tracking.keyspace``.

Choices, stated once:

- Failed calls are committed as events with ``error=True``: they count under ``errors``
  (not ``requests``) with whatever tokens and cost the tier reported, and release their
  hold in the same round trip. ``record_error`` is a shorthand for that.
- Tokens per minute are charged with the ``tokens`` estimate passed to ``admit``. If the
  event carries ``admitted_tokens`` (that same estimate), ``commit`` corrects the charge
  to the actual prompt + completion tokens; otherwise the estimate stands.
- A batch of recorded usage is counted all or nothing by id: a batch sent again (its
  reply lost to a timeout, say) is counted event by event instead, each id once.
- While Redis is unavailable rate limits are not enforced, free tiers serve, and every
  event is journaled; priced tiers are refused (``fail_closed``) or served without a
  budget check (``fail_open``). A timed-out ``admit`` may have held money in Redis; that
  hold returns when its TTL passes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tracking.batch import BatchConnection, batch_call
from tracking.config import BudgetsConfig, RedisConfig
from tracking.journal import Journal
from tracking.keys import ApiKey, KeyStore
from tracking.keyspace import (
    DAY_S,
    KeySpace,
    WindowKind,
    day_of,
    global_scope,
    key_scope,
    model_scope,
    month_of,
    tier_scope,
    window_end,
)
from tracking.pricing import PriceTable
from tracking.records import (
    Admission,
    Hold,
    HoldRequest,
    LedgerUnavailableError,
    RateLimited,
    Refusal,
    Scopes,
    UsageEvent,
    new_event_id,
)
from tracking.report import BudgetLimitsByScope, budget_limits, build_report

log = structlog.get_logger(__name__)

LedgerState = Literal["connected", "unavailable"]

# Errors that mean "Redis cannot be reached": the ledger goes unavailable and reconnects.
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)

_WINDOW_WORD = {"day": "daily", "month": "monthly"}

# How long a batch of usage gathers before it goes: the usage of a request reaches
# Redis this much later (plus a round trip); the client's answer is not delayed. A
# batch costs the daemon about as much CPU as building tens of events, so the longer
# it gathers, the less each event costs: 10 ms holds about 20 events at 2000 calls/s.
RECORD_WINDOW_S = 0.010
# A batch that a ``commit`` caller awaits goes after this long at most.
GROUP_COMMIT_WINDOW_S = 0.002
# A batch this large goes at once, and larger ones go in script calls of this many
# events: a script's run blocks Redis, so each stays short.
BATCH_MAX_EVENTS = 256


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _load_script(name: str) -> str:
    return resources.files("tracking").joinpath("lua", name).read_text(encoding="utf-8")


def _scope_label(scope: str) -> str:
    kind, _, name = scope.partition(":")
    return f"{kind} '{name}'" if name else scope


def _hold_for(
    req: HoldRequest, hold_id: str, day: str, month: str,
    budgets: tuple[tuple[str, WindowKind], ...] = (),
) -> Hold:
    return Hold(id=hold_id, tier=req.tier, model=req.model, key=req.key,
                amount_micros=req.amount_micros, day=day, month=month, budgets=budgets)


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
        self.journal = Journal(journal_path)
        self._state: LedgerState = "unavailable"
        self._redis: Redis | None = None
        self._admit: AsyncScript | None = None
        self._commit: AsyncScript | None = None
        self._release: AsyncScript | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False
        self._replaying = False
        # Counted for metrics: events that went to the journal, and events lost
        # (Redis and the journal both failed).
        self.journaled_events = 0
        self.lost_events = 0
        # Usage with no hold in Redis, waiting for the next batch: the events, and a
        # future for the commits awaiting that batch (made only if one does).
        self._pending: list[UsageEvent] = []
        self._pending_done: asyncio.Future[None] | None = None
        self._in_flight: list[UsageEvent] = []  # the batch being sent, and its future
        self._in_flight_done: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flusher_wake: asyncio.Future[None] | None = None
        self._batches: BatchConnection | None = None
        self.reconfigure(budgets=budgets, prices=prices, keys=keys)

    # -- configuration -------------------------------------------------------

    def reconfigure(self, *, budgets: BudgetsConfig, prices: PriceTable, keys: KeyStore) -> None:
        """Swap budgets, prices and keys (config reload); open holds keep their scopes."""
        self.prices = prices
        self.keys = keys
        self.budget_limits: BudgetLimitsByScope = budget_limits(budgets, keys)

    # -- connection ----------------------------------------------------------

    @property
    def state(self) -> LedgerState:
        return self._state

    @property
    def replaying(self) -> bool:
        """True while journaled usage is being replayed into Redis (for /readyz)."""
        return self._replaying

    async def start(self) -> None:
        """Connect and replay any journal left behind. Never raises for a Redis that is down."""
        # A blocking pool: past max_connections a call waits its turn (up to
        # pool_timeout_s) instead of failing at once.
        pool = BlockingConnectionPool.from_url(
            self.config.url,
            max_connections=self.config.max_connections,
            timeout=self.config.pool_timeout_s,
            socket_timeout=self.config.socket_timeout_s,
            socket_connect_timeout=self.config.connect_timeout_s,
            # No client-side retries: a retried script could hold twice, and a dead
            # Redis must fail fast. The reconnect loop does the waiting.
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = Redis.from_pool(pool)
        self._admit = self._redis.register_script(_load_script("admit.lua"))
        self._commit = self._redis.register_script(_load_script("commit.lua"))
        self._batches = BatchConnection(
            pool,
            _load_script("commit_batch.lua"),
            timeout_s=self.config.connect_timeout_s + self.config.socket_timeout_s,
        )
        self._release = self._redis.register_script(_load_script("release.lua"))
        try:
            await self._redis.ping()
        except (*_REDIS_DOWN, RedisError) as exc:
            self._lost(exc)
            return
        self._set_connected()
        try:
            await self._drain_journal()
        except (*_REDIS_DOWN, RedisError) as exc:
            self._lost(exc)

    async def aclose(self) -> None:
        """Send the pending usage batch, stop reconnecting, flush the journal, close the pool."""
        self._closed = True
        if self._flusher is not None:
            if self._flusher_wake is not None:
                _wake(self._flusher_wake)  # no need to wait out the batch window
            await asyncio.wait([self._flusher])
        # Left by a cancelled flusher (in flight or still pending): keep them. An event
        # that did reach Redis is skipped by id on replay.
        left, self._in_flight, self._pending = self._in_flight + self._pending, [], []
        await self._journal_many(left)
        for done in (self._in_flight_done, self._pending_done):
            if done is not None and not done.done():
                done.set_result(None)
        self._in_flight_done = self._pending_done = None
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            try:
                await self._reconnect_task
            except asyncio.CancelledError:
                pass
            self._reconnect_task = None
        await self.journal.flush()
        if self._batches is not None:
            await self._batches.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    def _set_connected(self) -> None:
        if self._state != "connected":
            log.info("ledger_connected", url=self._safe_url())
        self._state = "connected"

    def _lost(self, exc: BaseException) -> None:
        """Redis failed: go unavailable and reconnect in the background (once)."""
        if self._state == "connected" or self._reconnect_task is None:
            log.warning(
                "ledger_unavailable",
                url=self._safe_url(),
                error=f"{type(exc).__name__}: {exc}",
                on_unavailable=self.config.on_unavailable,
            )
        self._state = "unavailable"
        if not self._closed and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        assert self._redis is not None
        delay = self.config.reconnect_min_s
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.config.reconnect_max_s)
            try:
                await self._redis.ping()
            except (*_REDIS_DOWN, RedisError) as exc:
                log.debug("ledger_reconnect_failed", error=str(exc), retry_in_s=round(delay, 2))
                continue
            # Connected first, so new usage goes live and the journal only shrinks.
            self._set_connected()
            try:
                await self._drain_journal()
            except (*_REDIS_DOWN, RedisError) as exc:
                self._state = "unavailable"
                log.warning("journal_replay_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if self._state == "connected":  # no call failed meanwhile
                self._reconnect_task = None
                return

    def _safe_url(self) -> str:
        # The URL may carry a password; log host and port only.
        url = self.config.url
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    def _down(self, exc: BaseException) -> None:
        if isinstance(exc, _REDIS_DOWN):
            self._lost(exc)
        else:
            log.error("ledger_redis_error", error=f"{type(exc).__name__}: {exc}")

    # -- before a call -------------------------------------------------------

    def _applicable(self, req: HoldRequest) -> list[tuple[str, WindowKind, int]]:
        """(scope, window, limit) of every budget this hold must fit in."""
        scopes = [global_scope(), tier_scope(req.tier)]
        if req.key is not None:
            scopes.append(key_scope(req.key))
        return [
            (scope, kind, limit)
            for scope in scopes
            for kind, limit in self.budget_limits.get(scope, {}).items()
        ]

    def _needs_ledger(self, req: HoldRequest) -> bool:
        return req.amount_micros > 0 or self.prices.is_priced(req.tier)

    async def admit(
        self, *, key: ApiKey | None, tokens: int, hold: HoldRequest | None
    ) -> Admission:
        """Check the key's rate limits and hold the first tier's worst case, in one round trip.

        With no key limits and nothing to hold, Redis is not called at all.
        """
        now = time.time()
        day, month = day_of(now), month_of(now)
        limited = key is not None and key.has_rate_limits
        budgets = self._applicable(hold) if hold is not None and self._needs_ledger(hold) else []
        hold_id = new_event_id()

        ledger_ok = self._state == "connected"
        if ledger_ok and (limited or budgets):
            assert self._admit is not None
            keys, args = self._admit_call(
                key if limited else None, tokens, hold, hold_id, budgets, day, month
            )
            try:
                reply = await self._admit(keys=keys, args=args)
            except (*_REDIS_DOWN, RedisError) as exc:
                self._down(exc)
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

    def _admit_call(
        self,
        key: ApiKey | None,
        tokens: int,
        hold: HoldRequest | None,
        hold_id: str,
        budgets: list[tuple[str, WindowKind, int]],
        day: str,
        month: str,
    ) -> tuple[list[str], list[str | int]]:
        name = key.name if key is not None else "-"
        keys = [self.space.rate(name, "rpm"), self.space.rate(name, "tpm")]
        args: list[str | int] = [
            (key.rpm or 0) if key else 0,
            (key.tpm or 0) if key else 0,
            max(tokens, 0),
            hold_id if budgets else "",
            hold.amount_micros if hold is not None else 0,
            int(self.config.hold_ttl_s * 1000),
        ]
        for scope, kind, limit in budgets:
            period = day if kind == "day" else month
            keys += [
                self.space.usage(kind, period, scope),
                self.space.holds(kind, period, scope),
                self.space.held(kind, period, scope),
            ]
            args += [limit, window_end(kind, period) + self.config.retention_days * DAY_S]
        return keys, args

    def _admission(
        self,
        reply: list[Any],
        key: ApiKey | None,
        hold: HoldRequest | None,
        hold_id: str,
        budgets: list[tuple[str, WindowKind, int]],
        day: str,
        month: str,
    ) -> Admission:
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
            refusal = self._refusal(hold, scope, kind, limit, int(reply[2]), int(reply[3]))
            return Admission(refusal=refusal)
        return Admission(
            hold=_hold_for(hold, hold_id, day, month, tuple((scope, kind) for scope, kind, _ in budgets))
        )

    def _refusal(
        self, hold: HoldRequest, scope: str, kind: WindowKind, limit: int, spent: int, held: int
    ) -> Refusal:
        log.info(
            "budget_refused",
            tier=hold.tier,
            key=hold.key,
            scope=scope,
            window=kind,
            limit_micros=limit,
            spent_micros=spent,
            held_micros=held,
            amount_micros=hold.amount_micros,
        )
        message = (
            f"The {_WINDOW_WORD[kind]} budget of {_scope_label(scope)} "
            f"(${limit / 1_000_000:.2f}) is exhausted: ${spent / 1_000_000:.4f} spent, "
            f"${held / 1_000_000:.4f} held by calls in flight, and this call to tier "
            f"'{hold.tier}' may cost up to ${hold.amount_micros / 1_000_000:.4f}."
        )
        return Refusal(scope=scope, window=kind, message=message, tier=hold.tier)

    def _hold_without_redis(
        self, hold: HoldRequest, hold_id: str, day: str, month: str, *, ledger_ok: bool
    ) -> Hold | Refusal:
        """A hold that lives nowhere but here: free tier, no budget, or Redis unavailable."""
        priced = self._needs_ledger(hold)
        if priced and not ledger_ok and self.config.on_unavailable == "fail_closed":
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

    # -- after a call --------------------------------------------------------

    def record(self, event: UsageEvent) -> None:
        """Count a call that has no hold in Redis (a free tier, no budget), once, soon.

        Neither blocks nor needs awaiting: the event joins the pending batch, which goes
        to Redis within ``RECORD_WINDOW_S`` (at once when it reaches
        ``BATCH_MAX_EVENTS``) as one script call, or to the journal if Redis cannot
        take it. ``aclose`` sends what is pending. Needs a running event loop.
        """
        pending = self._pending
        pending.append(event)
        flusher = self._flusher
        if flusher is None or flusher.done():  # done: cancelled before it ever ran
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_batches(), name="ledger_usage_batch"
            )
        elif len(pending) >= BATCH_MAX_EVENTS and self._flusher_wake is not None:
            _wake(self._flusher_wake)

    async def flush(self) -> None:
        """Return once the usage recorded so far is in Redis or the journal (now, not
        after the batch window)."""
        if self._pending:
            done = self._pending_done
            if done is None:
                done = self._pending_done = asyncio.get_running_loop().create_future()
            if self._flusher_wake is not None:
                _wake(self._flusher_wake)
        elif self._in_flight:
            done = self._in_flight_done
            if done is None:
                done = self._in_flight_done = asyncio.get_running_loop().create_future()
        else:
            return
        await asyncio.shield(done)

    async def commit(self, hold: Hold | None, event: UsageEvent) -> None:
        """Settle ``hold`` (if any) to the event's actual cost and count the event, once.

        If Redis cannot take it, the event goes to the journal and is replayed later;
        the hold, if it was in Redis, returns when its TTL passes.

        With no hold in Redis to settle (a free tier, no budget) this is ``record`` that
        returns once the event's batch is in Redis or the journal; a batch awaited so
        goes within ``GROUP_COMMIT_WINDOW_S``.
        """
        if hold is None or not hold.budgets:
            self.record(event)
            done = self._pending_done
            if done is None:  # the first caller awaiting this batch: send it sooner
                loop = asyncio.get_running_loop()
                done = self._pending_done = loop.create_future()
                if self._flusher_wake is not None:
                    loop.call_later(GROUP_COMMIT_WINDOW_S, _wake, self._flusher_wake)
            await asyncio.shield(done)
            return
        if self._state == "connected":
            assert self._commit is not None
            keys, args = self._commit_call(hold, event, live=True)
            try:
                await self._commit(keys=keys, args=args)
                return
            except (*_REDIS_DOWN, RedisError) as exc:
                self._down(exc)
        await self._journal(event)

    async def _flush_batches(self) -> None:
        """Send pending usage, one batch at a time, until none is left. Events that
        arrive while a batch is in flight go in the next one."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                if len(self._pending) < BATCH_MAX_EVENTS and not self._closed:
                    waiter = self._flusher_wake = loop.create_future()
                    awaited = self._pending_done is not None
                    window = GROUP_COMMIT_WINDOW_S if awaited else RECORD_WINDOW_S
                    timer = loop.call_later(window, _wake, waiter)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
                        self._flusher_wake = None
                events = self._in_flight = self._pending
                self._in_flight_done = self._pending_done
                self._pending, self._pending_done = [], None
                try:
                    await self._send_batch(events)
                except BaseException as exc:  # the committers waiting see it
                    done = self._in_flight_done
                    if done is not None and not done.done():
                        if isinstance(exc, asyncio.CancelledError):
                            done.cancel()
                        else:
                            done.set_exception(exc)
                    self._in_flight_done = None
                    raise
                done, self._in_flight, self._in_flight_done = self._in_flight_done, [], None
                if done is not None and not done.done():
                    done.set_result(None)
        finally:
            self._flusher = None

    async def _send_batch(self, events: list[UsageEvent]) -> None:
        """Count ``events`` in Redis, ``BATCH_MAX_EVENTS`` to a script call, or journal
        those Redis did not confirm (the replay skips any it did count)."""
        for start in range(0, len(events), BATCH_MAX_EVENTS):
            if self._state != "connected":
                await self._journal_many(events[start:])
                return
            chunk = events[start : start + BATCH_MAX_EVENTS]
            try:
                await self._count_batch(chunk)
            except (*_REDIS_DOWN, RedisError) as exc:
                self._down(exc)
                await self._journal_many(events[start:])
                return
            except Exception as exc:  # a defect here, not Redis: keep the usage anyway
                log.error("usage_batch_failed", events=len(events) - start, error=repr(exc))
                await self._journal_many(events[start:])
                return

    async def _count_batch(self, events: Sequence[UsageEvent]) -> None:
        assert self._batches is not None
        keys, payload = batch_call(
            self.space,
            events,
            tpm_of=self._tpm_of,
            retention_days=self.config.retention_days,
            dedupe_days=self.config.dedupe_days,
        )
        if await self._batches.count(keys, payload):
            return
        # Some id was counted before (a batch sent again): count event by event, each
        # id once.
        log.info("usage_batch_seen_before", events=len(events))
        await self._commit_group(events)

    def _tpm_of(self, key_name: str) -> int:
        api_key = self.keys.by_name(key_name)
        return (api_key.tpm or 0) if api_key is not None else 0

    async def _commit_group(self, events: Sequence[UsageEvent]) -> None:
        assert self._redis is not None and self._commit is not None
        calls = [self._commit_call(None, event, live=True) for event in events]
        for reload in (False, True):
            if reload:  # Redis lost its scripts (a restart): load it and send again
                await self._redis.script_load(self._commit.script)
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(self._commit.sha, len(keys), *keys, *args)
                try:
                    await pipe.execute()
                    return
                except NoScriptError:
                    if reload:
                        raise

    async def record_error(self, scopes: Scopes, hold: Hold | None = None) -> None:
        """Count a failed call (and release its hold): a commit of an error event."""
        await self.commit(hold, UsageEvent(tier=scopes.tier, model=scopes.model, key=scopes.key, error=True))

    async def release(self, hold: Hold) -> None:
        """Give a hold back unspent (call cancelled before it cost anything)."""
        if not hold.budgets or self._state != "connected":
            return
        assert self._release is not None
        try:
            await self._release(keys=self._hold_keys(hold), args=[hold.id])
        except (*_REDIS_DOWN, RedisError) as exc:
            # The hold returns by itself when its TTL passes.
            self._down(exc)

    def _hold_keys(self, hold: Hold) -> list[str]:
        keys: list[str] = []
        for scope, kind in hold.budgets:
            period = hold.day if kind == "day" else hold.month
            keys += [
                self.space.usage(kind, period, scope),
                self.space.holds(kind, period, scope),
                self.space.held(kind, period, scope),
            ]
        return keys

    def _commit_call(
        self, hold: Hold | None, event: UsageEvent, *, live: bool
    ) -> tuple[list[str], list[str | int]]:
        day, month = day_of(event.ts), month_of(event.ts)
        scopes = [global_scope(), tier_scope(event.tier), model_scope(event.model)]
        tpm, tpm_delta = 0, 0
        if event.key is not None:
            scopes.append(key_scope(event.key))
            api_key = self.keys.by_name(event.key)
            if live and api_key is not None and api_key.tpm and event.admitted_tokens is not None:
                tpm = api_key.tpm
                tpm_delta = event.prompt_tokens + event.completion_tokens - event.admitted_tokens
        hold_keys = self._hold_keys(hold) if hold is not None else []
        periods: list[tuple[WindowKind, str]] = [("day", day), ("month", month)]
        usage_keys = [self.space.usage(kind, period, s) for kind, period in periods for s in scopes]
        usage_expiry = [
            window_end(kind, period) + self.config.retention_days * DAY_S
            for kind, period in periods
            for _ in scopes
        ]
        index_keys = [self.space.index(kind, period) for kind, period in periods]
        index_expiry = [window_end(kind, period) + self.config.retention_days * DAY_S for kind, period in periods]
        keys = [
            self.space.events(day),
            self.space.rate(event.key or "-", "tpm"),
            *hold_keys,
            *usage_keys,
            *index_keys,
        ]
        args: list[str | int] = [
            event.id,
            hold.id if hold is not None and hold.budgets else "",
            len(hold_keys) // 3,
            len(usage_keys),
            len(index_keys),
            event.prompt_tokens,
            event.completion_tokens,
            event.cost_micros,
            1 if event.error else 0,
            window_end("day", day) + self.config.dedupe_days * DAY_S,
            tpm,
            tpm_delta,
            json.dumps(scopes),
            *usage_expiry,
            *index_expiry,
        ]
        return keys, args

    # -- journal -------------------------------------------------------------

    async def _journal_many(self, events: Sequence[UsageEvent]) -> None:
        """Journal ``events`` in one write (one fsync)."""
        if not events:
            return
        try:
            await self.journal.append_many(events)
        except OSError as exc:
            self.lost_events += len(events)
            log.error("usage_lost", events=len(events), first_event_id=events[0].id,
                      tier=events[0].tier, error=str(exc))
            return
        self.journaled_events += len(events)
        log.debug("usage_journaled", events=len(events), first_event_id=events[0].id,
                  tier=events[0].tier)

    async def _journal(self, event: UsageEvent) -> None:
        await self._journal_many((event,))

    async def _drain_journal(self) -> None:
        """Replay every journaled event into Redis (raises if Redis fails midway).

        Called once connected: appends still in flight land first, and no new ones
        start unless a call fails again (which starts another reconnect and drain).
        """
        self._replaying = True
        try:
            await self.journal.flush()
            while await asyncio.to_thread(self.journal.has_entries):
                read, counted = await self.journal.replay(self._replay_batch)
                log.info("journal_replayed", events=read, counted=counted, duplicates=read - counted)
        finally:
            self._replaying = False

    async def _replay_batch(self, events: Sequence[UsageEvent]) -> int:
        assert self._redis is not None and self._commit is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                keys, args = self._commit_call(None, event, live=False)
                await self._commit(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        return sum(int(r) for r in replies)

    # -- reports -------------------------------------------------------------

    async def report(self, *, day: str | None = None, month: str | None = None) -> dict[str, Any]:
        """Usage against budget per scope and window, as JSON-able data (reads Redis)."""
        if self._redis is None or self._state != "connected":
            raise LedgerUnavailableError("the usage ledger (Redis) is unavailable")
        try:
            report = await build_report(self._redis, self.space, self.budget_limits, day=day, month=month)
        except (*_REDIS_DOWN, RedisError) as exc:
            self._down(exc)
            raise LedgerUnavailableError(f"the usage ledger (Redis) failed: {exc}") from exc
        report["ledger"] = self._state
        return report

