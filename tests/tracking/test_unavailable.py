"""Redis stopped and restarted under the ledger: nothing lost, nothing counted twice.

The redis-server is session-scoped: every test here restarts it in a ``finally``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from redis.asyncio import Redis

from tests.support.redis_server import RedisServer
from tracking import BudgetsConfig, Hold, HoldRequest, Refusal, UsageEvent
from tracking.keyspace import KeySpace, day_of

from .conftest import MakeLedger, wait_for

SPACE = KeySpace("tiergate")
BUDGET = BudgetsConfig.model_validate({"global": {"daily_usd": 1.0}})


def _free(i: int) -> UsageEvent:
    return UsageEvent(tier="local", model="smol", key="alice", prompt_tokens=i, completion_tokens=1)


async def _global_day(redis_url: str) -> dict[str, int]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        raw = await client.hgetall(SPACE.usage("day", day_of(time.time()), "global"))  # type: ignore[arg-type]
    finally:
        await client.aclose()
    return {k: int(v) for k, v in raw.items()}


def _paid() -> HoldRequest:
    return HoldRequest(tier="paid", model="m", key=None, amount_micros=100)


async def test_down_at_start_then_journal_and_replay_once(
    make_ledger: MakeLedger, redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "usage.jsonl"
    redis_server.stop()
    try:
        ledger = await make_ledger(budgets=BUDGET, journal=journal)  # must not raise
        assert ledger.state == "unavailable"
        refused = await ledger.reserve(_paid())
        assert isinstance(refused, Refusal) and refused.code == "ledger_unavailable"
        # A free tier still serves and its usage is journaled.
        free = await ledger.admit(key=None, tokens=5, hold=HoldRequest("local", "smol", None, 0))
        assert free.hold is not None and free.refusal is None
        await asyncio.gather(*[ledger.commit(None, _free(i)) for i in range(1, 51)])
        assert ledger.journaled_events == 50
        saved = journal.read_bytes()
    finally:
        redis_server.start()
    await wait_for(lambda: ledger.state == "connected" and not ledger.replaying)
    usage = await _global_day(redis_url)
    assert usage["requests"] == 50 and usage["prompt_tokens"] == sum(range(1, 51))
    assert not journal.exists()

    # A crash after replay but before the journal was removed: the same records
    # come back on the next start and must not count again.
    journal.write_bytes(saved)
    other = await make_ledger(journal=journal)
    assert other.state == "connected"
    assert not journal.exists()
    assert (await _global_day(redis_url))["requests"] == 50
    # And live commits go straight to Redis again.
    await ledger.commit(None, _free(1000))
    assert (await _global_day(redis_url))["requests"] == 51


async def test_lost_mid_flight_commit_is_journaled_and_replayed(
    make_ledger: MakeLedger, redis_server: RedisServer, redis_url: str
) -> None:
    ledger = await make_ledger(budgets=BUDGET, hold_ttl_s=0.5)
    hold = await ledger.reserve(_paid())
    assert isinstance(hold, Hold) and hold.budgets
    redis_server.stop()
    try:
        # The priced call finished while Redis was away: its usage is still kept.
        await ledger.commit(hold, UsageEvent(tier="paid", model="m", key=None, prompt_tokens=10, cost_micros=10))
        assert ledger.state == "unavailable"
        await ledger.commit(None, _free(3))
        assert ledger.journaled_events == 2
        assert isinstance(await ledger.reserve(_paid()), Refusal)  # fail closed
    finally:
        redis_server.start()  # a fresh, empty server (no persistence)
    await wait_for(lambda: ledger.state == "connected" and not ledger.replaying)
    usage = await _global_day(redis_url)
    assert usage["requests"] == 2 and usage["cost_micros"] == 10
    assert isinstance(await ledger.reserve(_paid()), Hold)


async def test_fail_open_serves_priced_tiers_and_journals(
    make_ledger: MakeLedger, redis_server: RedisServer, redis_url: str
) -> None:
    redis_server.stop()
    try:
        ledger = await make_ledger(budgets=BUDGET, on_unavailable="fail_open")
        hold = await ledger.reserve(_paid())
        assert isinstance(hold, Hold) and hold.budgets == ()  # served, held nowhere
        await ledger.commit(hold, UsageEvent(tier="paid", model="m", key=None, prompt_tokens=7, cost_micros=7))
    finally:
        redis_server.start()
    await wait_for(lambda: ledger.state == "connected" and not ledger.replaying)
    usage = await _global_day(redis_url)
    assert usage["requests"] == 1 and usage["cost_micros"] == 7


async def test_redis_bounced_under_load_counts_every_event_once(
    make_ledger: MakeLedger, redis_server: RedisServer, redis_url: str
) -> None:
    # Let this server keep its data across the bounce (it saves on SIGTERM), so the
    # count below covers events sent before, during and after the outage, including
    # any whose reply was cut off mid-flight and that went to the journal as well.
    admin = Redis.from_url(redis_url)
    await admin.config_set("save", "3600 1")
    await admin.aclose()
    ledger = await make_ledger()
    events = [_free(1) for _ in range(300)]

    async def stream() -> None:
        for i, event in enumerate(events):
            await ledger.commit(None, event)
            if i % 10 == 0:
                await asyncio.sleep(0.005)

    async def bounce() -> None:
        await asyncio.sleep(0.1)
        await asyncio.to_thread(redis_server.stop)

    try:
        await asyncio.gather(stream(), bounce())
        assert 0 < ledger.journaled_events < 300  # some went live, some to the journal
    finally:
        if redis_server.process is None:
            redis_server.start()  # loads the saved data back
        (redis_server.workdir / "dump.rdb").unlink(missing_ok=True)
    await wait_for(lambda: ledger.state == "connected" and not ledger.replaying)
    usage = await _global_day(redis_url)
    assert usage["requests"] == 300 and usage["prompt_tokens"] == 300
