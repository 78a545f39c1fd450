"""After a call: usage counted in Redis, exactly once, batched when nothing is held.

A call that settles a budget hold is one ``commit.lua`` call, at once. Usage with no
hold in Redis (free tiers, no budget) costs less still: ``record`` adds the event to a
batch and returns; every ``RECORD_WINDOW_S`` (or ``BATCH_MAX_EVENTS``) one
``commit_batch.lua`` call counts the whole batch, summed per usage hash
(``tracking.batch``). A batch counted before (its reply lost to a timeout, say) is
counted event by event instead, each id once. What Redis cannot take goes to the
journal (``tracking.replay``).

Failed calls are committed as events with ``error=True``: they count under ``errors``
(not ``requests``) with whatever tokens and cost the tier reported. Tokens per minute
are charged at admission with an estimate; an event carrying ``admitted_tokens`` (that
estimate) corrects the charge to the actual prompt + completion tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog
from redis.exceptions import NoScriptError

from tracking.batch import batch_call
from tracking.config import RedisConfig
from tracking.connection import REDIS_FAILED, LedgerConnection
from tracking.keyspace import KeySpace
from tracking.marshal import commit_call
from tracking.records import Hold, UsageEvent
from tracking.replay import Backlog
from tracking.terms import LedgerTerms

log = structlog.get_logger(__name__)

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


class UsageBatcher:
    """Fast path: docs/BENCHMARKS.md "batched usage" (one script call per batch, no
    task per request)."""

    def __init__(self, connection: LedgerConnection, backlog: Backlog, space: KeySpace,
                 config: RedisConfig, terms: LedgerTerms) -> None:
        self._connection = connection
        self._backlog = backlog
        self._space = space
        self._config = config
        self.terms = terms
        self._closed = False
        # Usage waiting for the next batch: the events, and a future for the commits
        # awaiting that batch (made only if one does).
        self._pending: list[UsageEvent] = []
        self._pending_done: asyncio.Future[None] | None = None
        self._in_flight: list[UsageEvent] = []  # the batch being sent, and its future
        self._in_flight_done: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flusher_wake: asyncio.Future[None] | None = None

    def record(self, event: UsageEvent) -> None:
        """Count a call that has no hold in Redis, once, soon; see ``Ledger.record``."""
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
        """Return once the usage recorded so far is in Redis or the journal."""
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
        """Settle ``hold`` and count ``event``; see ``Ledger.commit``."""
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
        connection = self._connection
        if connection.connected:
            assert connection.scripts is not None
            keys, args = commit_call(self._space, self._config, hold, event, self.terms.keys)
            try:
                await connection.scripts.commit(keys=keys, args=args)
                return
            except REDIS_FAILED as exc:
                connection.down(exc)
        await self._backlog.keep((event,))

    async def aclose(self) -> None:
        """Send the pending batch now; what a cancelled send left goes to the journal."""
        self._closed = True
        if self._flusher is not None:
            if self._flusher_wake is not None:
                _wake(self._flusher_wake)  # no need to wait out the batch window
            await asyncio.wait([self._flusher])
        # Left by a cancelled flusher (in flight or still pending): keep them. An event
        # that did reach Redis is skipped by id on replay.
        left, self._in_flight, self._pending = self._in_flight + self._pending, [], []
        await self._backlog.keep(left)
        for done in (self._in_flight_done, self._pending_done):
            if done is not None and not done.done():
                done.set_result(None)
        self._in_flight_done = self._pending_done = None

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
        connection = self._connection
        for start in range(0, len(events), BATCH_MAX_EVENTS):
            if not connection.connected:
                await self._backlog.keep(events[start:])
                return
            chunk = events[start : start + BATCH_MAX_EVENTS]
            try:
                await self._count_batch(chunk)
            except REDIS_FAILED as exc:
                connection.down(exc)
                await self._backlog.keep(events[start:])
                return
            except Exception as exc:  # a defect here, not Redis: keep the usage anyway
                log.error("usage_batch_failed", events=len(events) - start, error=repr(exc))
                await self._backlog.keep(events[start:])
                return

    async def _count_batch(self, events: Sequence[UsageEvent]) -> None:
        batches = self._connection.batches
        assert batches is not None
        keys, payload = batch_call(
            self._space,
            events,
            tpm_of=self._tpm_of,
            retention_days=self._config.retention_days,
            dedupe_days=self._config.dedupe_days,
        )
        if await batches.count(keys, payload):
            return
        # Some id was counted before (a batch sent again): count event by event, each
        # id once.
        log.info("usage_batch_seen_before", events=len(events))
        await self._commit_each(events)

    def _tpm_of(self, key_name: str) -> int:
        api_key = self.terms.keys.by_name(key_name)
        return (api_key.tpm or 0) if api_key is not None else 0

    async def _commit_each(self, events: Sequence[UsageEvent]) -> None:
        connection = self._connection
        assert connection.redis is not None and connection.scripts is not None
        script = connection.scripts.commit
        calls = [commit_call(self._space, self._config, None, event, self.terms.keys) for event in events]
        for reload in (False, True):
            if reload:  # Redis lost its scripts (a restart): load it and send again
                await connection.redis.script_load(script.script)
            async with connection.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                try:
                    await pipe.execute()
                    return
                except NoScriptError:
                    if reload:
                        raise
