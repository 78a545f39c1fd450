"""Usage Redis could not take: journaled, counted, and replayed once Redis is back.

Every event carries an id and Redis counts an id once, so a replay that stops midway
(Redis fails again, the daemon dies) is simply run again; see ``tracking.journal``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from tracking.config import RedisConfig
from tracking.connection import LedgerConnection
from tracking.journal import Journal
from tracking.keyspace import KeySpace
from tracking.marshal import commit_call
from tracking.records import UsageEvent

log = structlog.get_logger(__name__)


class Backlog:
    def __init__(self, journal: Journal, connection: LedgerConnection, space: KeySpace,
                 config: RedisConfig) -> None:
        self.journal = journal
        self._connection = connection
        self._space = space
        self._config = config
        self.replaying = False
        # Counted for metrics: events that went to the journal, and events lost
        # (Redis and the journal both failed).
        self.journaled_events = 0
        self.lost_events = 0

    async def keep(self, events: Sequence[UsageEvent]) -> None:
        """Journal ``events`` in one write (one fsync); never raises."""
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

    async def replay(self) -> None:
        """Replay every journaled event into Redis (raises if Redis fails midway).

        Run once connected: appends still in flight land first, and no new ones start
        unless a call fails again (which starts another reconnect and replay).
        """
        self.replaying = True
        try:
            await self.journal.flush()
            while await asyncio.to_thread(self.journal.has_entries):
                read, counted = await self.journal.replay(self._replay_batch)
                log.info("journal_replayed", events=read, counted=counted, duplicates=read - counted)
        finally:
            self.replaying = False

    async def _replay_batch(self, events: Sequence[UsageEvent]) -> int:
        connection = self._connection
        assert connection.redis is not None and connection.scripts is not None
        script = connection.scripts.commit
        async with connection.redis.pipeline(transaction=False) as pipe:
            for event in events:
                keys, args = commit_call(self._space, self._config, None, event, None)
                await script(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        return sum(int(r) for r in replies)

    async def flush(self) -> None:
        """Wait for journal appends in flight."""
        await self.journal.flush()
