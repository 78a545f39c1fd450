"""Usage with no hold: ``Ledger.record`` batches, one ``commit_batch.lua`` call a batch."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis

from tests.support.redis_server import RedisServer
from tracking import Ledger, UsageEvent
from tracking.keyspace import DAY_S, KeySpace, day_of, month_of

from .conftest import MakeLedger, wait_for

SPACE = KeySpace("tiergate")
FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_micros")


async def _evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def _usage(redis: Redis, kind: str, period: str, scope: str) -> dict[str, int]:
    raw = await redis.hgetall(SPACE.usage(kind, period, scope))  # type: ignore[arg-type]
    return {k: int(v) for k, v in raw.items()}


def _expected(events: list[UsageEvent]) -> dict[tuple[str, str, str], dict[str, int]]:
    """What counting each event on its own gives, per (window kind, period, scope)."""
    out: dict[tuple[str, str, str], Counter[str]] = {}
    for e in events:
        scopes = ["global", f"tier:{e.tier}", f"model:{e.model}"] + ([f"key:{e.key}"] if e.key else [])
        for kind, period in (("day", day_of(e.ts)), ("month", month_of(e.ts))):
            for scope in scopes:
                c = out.setdefault((kind, period, scope), Counter())
                c["errors" if e.error else "requests"] += 1
                c["prompt_tokens"] += e.prompt_tokens
                c["completion_tokens"] += e.completion_tokens
                c["cost_micros"] += e.cost_micros
    return {where: {f: c[f] for f in FIELDS if f in c} for where, c in out.items()}


async def _assert_counted(redis: Redis, events: list[UsageEvent]) -> None:
    expected = _expected(events)
    for (kind, period, scope), counts in expected.items():
        assert await _usage(redis, kind, period, scope) == counts, (kind, period, scope)
    for kind, period in {(k, p) for k, p, _ in expected}:
        scopes = {s for k, p, s in expected if (k, p) == (kind, period)}
        assert await redis.smembers(SPACE.index(kind, period)) == scopes  # type: ignore[arg-type]


def _mixed(n: int, ts: float | None = None) -> list[UsageEvent]:
    tiers = [("local", "smol", 0), ("paid", "gpt-x:1", 3), ("paid2", "gpt-y", 5)]
    events = []
    for i in range(n):
        tier, model, price = tiers[i % 3]
        events.append(
            UsageEvent(
                tier=tier, model=model, key=[None, "alice", "bob"][i % 4 % 3],
                prompt_tokens=i, completion_tokens=2 * i, cost_micros=price * i,
                error=i % 7 == 0, **({"ts": ts} if ts is not None else {}),
            )
        )
    return events


async def _warm(ledger: Ledger, redis: Redis) -> None:
    """Load both scripts first, so counting calls below sees no NOSCRIPT retry: the
    second batch, seen before, goes event by event."""
    warm = UsageEvent(tier="warm", model="warm", key=None)
    for _ in range(2):
        ledger.record(warm)
        await ledger.flush()
    await redis.delete(*[k async for k in redis.scan_iter("tiergate:*")])


async def test_mixed_batch_lands_exactly_in_one_script_call(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger()
    await _warm(ledger, redis)
    events = _mixed(90)
    before = await _evalsha_calls(redis)
    for e in events:
        assert ledger.record(e) is None  # neither a coroutine nor a task to await
    await ledger.flush()
    assert await _evalsha_calls(redis) == before + 1
    await _assert_counted(redis, events)
    assert await redis.scard(SPACE.events(day_of(time.time()))) == 90  # type: ignore[arg-type]
    assert ledger.journaled_events == 0


async def test_batch_larger_than_the_cap_goes_in_several_calls(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger()
    await _warm(ledger, redis)
    events = _mixed(600)
    before = await _evalsha_calls(redis)
    for e in events:
        ledger.record(e)
    await ledger.flush()
    assert await _evalsha_calls(redis) == before + 3  # 256 + 256 + 88
    await _assert_counted(redis, events)


async def test_batch_straddling_midnight_and_month_end_lands_in_each_window(
    make_ledger: MakeLedger, redis: Redis
) -> None:
    ledger = await make_ledger(retention_days=400, dedupe_days=400)
    await _warm(ledger, redis)
    now = datetime.now(UTC)
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC).timestamp()
    before_midnight = _mixed(20, ts=month_start - 0.25)
    after_midnight = _mixed(13, ts=month_start + 0.25)
    days = {day_of(month_start - 1), day_of(month_start)}
    months = {month_of(month_start - 1), month_of(month_start)}
    assert len(days) == 2 and len(months) == 2
    calls = await _evalsha_calls(redis)
    for a, b in zip(before_midnight, after_midnight + after_midnight[:7], strict=True):
        ledger.record(a)
        ledger.record(b)
    await ledger.flush()
    assert await _evalsha_calls(redis) == calls + 1
    await _assert_counted(redis, before_midnight + after_midnight)  # the repeats once
    assert await redis.scard(SPACE.events(day_of(month_start - 1))) == 20  # type: ignore[arg-type]
    assert await redis.scard(SPACE.events(day_of(month_start))) == 13  # type: ignore[arg-type]
    ttl = await redis.ttl(SPACE.events(day_of(month_start - 1)))
    assert abs(ttl - (month_start + 400 * DAY_S - time.time())) < 5  # its own day's end + 400 days


async def test_batch_sent_again_is_not_counted_twice(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger()
    await _warm(ledger, redis)
    first = _mixed(40)
    for e in first:
        ledger.record(e)
    await ledger.flush()
    # The same events again (a retried batch, say), with new ones among them: the
    # script changes nothing and the batch is counted event by event, each id once.
    new = _mixed(11)
    calls = await _evalsha_calls(redis)
    for e in first[:25] + new:
        ledger.record(e)
    await ledger.flush()
    assert await _evalsha_calls(redis) == calls + 1 + 36
    await _assert_counted(redis, first + new)
    # Another daemon counting the same ids: nothing changes either.
    other = await make_ledger()
    for e in first:
        await other.commit(None, e)
    await _assert_counted(redis, first + new)


async def test_batch_failing_mid_flight_is_journaled_and_replayed_once(
    make_ledger: MakeLedger, redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    # The server keeps its data across the stop (saves on SIGTERM), as a real one would.
    admin = Redis.from_url(redis_url, decode_responses=True)
    await admin.config_set("save", "3600 1")
    await admin.aclose()
    journal = tmp_path / "usage.jsonl"
    ledger = await make_ledger(journal=journal)
    landed = _mixed(30)
    for e in landed:
        ledger.record(e)
    await ledger.flush()
    lost = _mixed(45)
    try:
        redis_server.stop()  # the ledger has not noticed yet
        for e in lost:
            ledger.record(e)
        await ledger.flush()
        assert ledger.journaled_events == 45 and ledger.state == "unavailable"
        # A batch whose reply was cut off after Redis counted it is journaled as well.
        await ledger.journal.append_many(landed)
        # Usage recorded while Redis is away goes straight to the journal.
        late = _mixed(5)
        for e in late:
            ledger.record(e)
        await ledger.flush()
        assert ledger.journaled_events == 50
        assert len(journal.read_text().splitlines()) == 80
    finally:
        if redis_server.process is None:
            redis_server.start()
        (redis_server.workdir / "dump.rdb").unlink(missing_ok=True)
    await wait_for(lambda: ledger.state == "connected" and not ledger.replaying)
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        await _assert_counted(admin, landed + lost + late)
    finally:
        await admin.aclose()
    assert not journal.exists()


async def test_redis_restarted_between_batches_loses_no_batch(
    make_ledger: MakeLedger, redis_server: RedisServer, redis_url: str
) -> None:
    ledger = await make_ledger()
    ledger.record(UsageEvent(tier="local", model="smol", key=None))
    await ledger.flush()
    redis_server.restart()  # empty, no scripts; the batch connection is stale
    events = _mixed(12)
    for e in events:
        ledger.record(e)
    await ledger.flush()
    assert ledger.journaled_events == 0 and ledger.state == "connected"
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        await _assert_counted(admin, events)
    finally:
        await admin.aclose()


async def test_aclose_sends_the_pending_batch(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger()
    events = _mixed(17)
    for e in events:
        ledger.record(e)
    await ledger.aclose()
    await _assert_counted(redis, events)
    assert ledger.journaled_events == 0


async def test_aclose_journals_the_pending_batch_when_redis_is_gone(
    make_ledger: MakeLedger, redis_server: RedisServer, tmp_path: Path
) -> None:
    journal = tmp_path / "usage.jsonl"
    ledger = await make_ledger(journal=journal)
    events = _mixed(9)
    try:
        redis_server.stop()
        for e in events:
            ledger.record(e)
        await ledger.aclose()
    finally:
        redis_server.start()
    assert ledger.journaled_events == 9
    lines = journal.read_text().splitlines()
    assert sorted(UsageEvent.from_json(json.loads(line)).id for line in lines) == sorted(e.id for e in events)
