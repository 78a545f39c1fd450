from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

from tracking import (
    BudgetLimits,
    BudgetsConfig,
    Hold,
    HoldRequest,
    KeyConfig,
    Refusal,
    Scopes,
    UsageEvent,
    hash_key,
)
from tracking.keyspace import KeySpace, day_of, month_of

from .conftest import MakeLedger, wait_for

SPACE = KeySpace("tiergate")


def _budgets(**kw: object) -> BudgetsConfig:
    return BudgetsConfig.model_validate(kw)


def _today() -> tuple[str, str]:
    now = time.time()
    return day_of(now), month_of(now)


async def _usage(redis: Redis, kind: str, scope: str) -> dict[str, int]:
    day, month = _today()
    raw = await redis.hgetall(SPACE.usage(kind, day if kind == "day" else month, scope))  # type: ignore[arg-type]
    return {k: int(v) for k, v in raw.items()}


def _req(amount: int, tier: str = "paid", key: str | None = None) -> HoldRequest:
    return HoldRequest(tier=tier, model="m", key=key, amount_micros=amount)


async def test_concurrent_reserves_across_two_daemons_grant_exactly_n(
    make_ledger: MakeLedger, redis: Redis
) -> None:
    n, amount = 37, 1000
    budgets = _budgets(**{"global": {"daily_usd": n * amount / 1_000_000}})
    a, b = await make_ledger(budgets=budgets), await make_ledger(budgets=budgets)
    results = await asyncio.gather(
        *[(a if i % 2 else b).reserve(_req(amount)) for i in range(200)]
    )
    holds = [r for r in results if isinstance(r, Hold)]
    refusals = [r for r in results if isinstance(r, Refusal)]
    assert len(holds) == n and len(refusals) == 200 - n
    assert {(r.scope, r.window) for r in refusals} == {("global", "day")}
    assert (await _usage(redis, "day", "global"))["held_micros"] == n * amount

    # Settle each to a smaller actual cost: the rest of every hold comes back.
    await asyncio.gather(
        *[
            (a if i % 2 else b).commit(h, UsageEvent(tier="paid", model="m", key=None, prompt_tokens=400, cost_micros=400))
            for i, h in enumerate(holds)
        ]
    )
    day = await _usage(redis, "day", "global")
    assert day["held_micros"] == 0 and day["cost_micros"] == n * 400 and day["requests"] == n

    # No false refusal while money remains: exactly what is left is granted again.
    left = n * amount - n * 400
    again = await asyncio.gather(*[a.reserve(_req(amount)) for _ in range(50)])
    assert sum(isinstance(r, Hold) for r in again) == left // amount


async def test_hold_is_all_or_nothing_across_scopes(make_ledger: MakeLedger, redis: Redis) -> None:
    budgets = _budgets(
        **{"global": {"daily_usd": 1.0, "monthly_usd": 1.0}, "tiers": {"paid": {"monthly_usd": 0.000500}}}
    )
    keys = [KeyConfig(name="alice", sha256=hash_key("t"), budget=BudgetLimits(daily_usd=1.0))]
    ledger = await make_ledger(budgets=budgets, keys=keys)
    # The tier's monthly budget is the one short; nothing may be held anywhere.
    refused = await ledger.reserve(_req(600, key="alice"))
    assert isinstance(refused, Refusal)
    assert (refused.scope, refused.window, refused.code) == ("tier:paid", "month", "budget_exhausted")
    assert "monthly budget of tier 'paid'" in refused.message
    day, month = _today()
    for kind, period, scope in [
        ("day", day, "global"),
        ("month", month, "global"),
        ("month", month, "tier:paid"),
        ("day", day, "key:alice"),
    ]:
        assert int(await redis.hget(SPACE.usage(kind, period, scope), "held_micros") or 0) == 0  # type: ignore[arg-type]
        assert await redis.zcard(SPACE.holds(kind, period, scope)) == 0  # type: ignore[arg-type]

    hold = await ledger.reserve(_req(500, key="alice"))
    assert isinstance(hold, Hold)
    assert set(hold.budgets) == {("global", "day"), ("global", "month"), ("tier:paid", "month"), ("key:alice", "day")}
    for scope, kind in hold.budgets:
        assert (await _usage(redis, kind, scope))["held_micros"] == 500


async def test_key_budget_refusal_names_the_key(make_ledger: MakeLedger) -> None:
    keys = [KeyConfig(name="alice", sha256=hash_key("t"), budget=BudgetLimits(daily_usd=0.001))]
    ledger = await make_ledger(keys=keys)
    assert isinstance(await ledger.reserve(_req(1000, key="alice")), Hold)
    refused = await ledger.reserve(_req(1, key="alice"))
    assert isinstance(refused, Refusal) and (refused.scope, refused.window) == ("key:alice", "day")
    # Another key (no budget) and no key at all are not limited by alice's budget.
    assert isinstance(await ledger.reserve(_req(1000, key="bob")), Hold)
    assert isinstance(await ledger.reserve(_req(1000)), Hold)


async def test_expired_hold_returns_its_money(make_ledger: MakeLedger, redis: Redis) -> None:
    budgets = _budgets(**{"global": {"daily_usd": 0.001}})
    dead = await make_ledger(budgets=budgets, hold_ttl_s=0.3)
    alive = await make_ledger(budgets=budgets, hold_ttl_s=0.3)
    assert isinstance(await dead.reserve(_req(1000)), Hold)
    await dead.aclose()  # dies holding the whole budget, never commits
    assert isinstance(await alive.reserve(_req(1000)), Refusal)
    await asyncio.sleep(0.5)
    hold = await alive.reserve(_req(1000))
    assert isinstance(hold, Hold)
    assert (await _usage(redis, "day", "global"))["held_micros"] == 1000  # the new one only


async def test_release_gives_the_hold_back(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger(budgets=_budgets(**{"global": {"daily_usd": 0.001}}))
    hold = await ledger.reserve(_req(1000))
    assert isinstance(hold, Hold)
    assert isinstance(await ledger.reserve(_req(1)), Refusal)
    await ledger.release(hold)
    assert (await _usage(redis, "day", "global"))["held_micros"] == 0
    assert isinstance(await ledger.reserve(_req(1000)), Hold)


async def test_commit_records_the_truth_even_above_the_hold(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger(budgets=_budgets(**{"global": {"daily_usd": 1.0}}))
    hold = await ledger.reserve(_req(100))
    assert isinstance(hold, Hold)
    await ledger.commit(hold, UsageEvent(tier="paid", model="m", key=None, prompt_tokens=50, completion_tokens=100, cost_micros=250))
    day = await _usage(redis, "day", "global")
    assert day["cost_micros"] == 250 and day["held_micros"] == 0


async def test_failed_call_counts_an_error_and_releases(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger(budgets=_budgets(**{"global": {"daily_usd": 1.0}}))
    hold = await ledger.reserve(_req(700, key="alice"))
    assert isinstance(hold, Hold)
    await ledger.record_error(Scopes(tier="paid", model="m", key="alice"), hold)
    for scope in ("global", "tier:paid", "model:m", "key:alice"):
        usage = await _usage(redis, "day", scope)
        assert usage["errors"] == 1 and usage.get("requests", 0) == 0 and usage["cost_micros"] == 0
    assert (await _usage(redis, "day", "global"))["held_micros"] == 0


async def test_usage_counted_per_scope_and_window_with_retention(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger(retention_days=10, dedupe_days=2)
    for prompt, completion in [(10, 20), (5, 1)]:
        await ledger.commit(None, UsageEvent(tier="paid", model="gpt-x:1", key="alice", prompt_tokens=prompt, completion_tokens=completion, cost_micros=prompt + 2 * completion))
    await ledger.commit(None, UsageEvent(tier="local", model="smol", key=None, prompt_tokens=3, completion_tokens=4))
    expected_paid = {"requests": 2, "prompt_tokens": 15, "completion_tokens": 21, "cost_micros": 57}
    for kind in ("day", "month"):
        assert await _usage(redis, kind, "tier:paid") == expected_paid
        assert await _usage(redis, kind, "model:gpt-x:1") == expected_paid
        assert await _usage(redis, kind, "key:alice") == expected_paid
        assert await _usage(redis, kind, "global") == {"requests": 3, "prompt_tokens": 18, "completion_tokens": 25, "cost_micros": 57}
        assert await _usage(redis, kind, "tier:local") == {"requests": 1, "prompt_tokens": 3, "completion_tokens": 4, "cost_micros": 0}
    day, month = _today()
    day_ttl = await redis.ttl(SPACE.usage("day", day, "global"))
    month_ttl = await redis.ttl(SPACE.usage("month", month, "global"))
    assert 10 * 86400 < day_ttl <= 11 * 86400
    assert 10 * 86400 < month_ttl <= 41 * 86400 and month_ttl >= day_ttl
    events_ttl = await redis.ttl(SPACE.events(day))
    assert 2 * 86400 < events_ttl <= 3 * 86400


async def test_same_event_counts_once(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger()
    event = UsageEvent(tier="local", model="smol", key=None, prompt_tokens=3)
    await ledger.commit(None, event)
    await ledger.commit(None, event)
    assert (await _usage(redis, "day", "global"))["requests"] == 1


async def test_concurrent_free_commits_each_count_once(make_ledger: MakeLedger, redis: Redis) -> None:
    # Commits with no hold in Redis go out in pipelined groups: none lost, none doubled.
    ledger = await make_ledger()
    events = [UsageEvent(tier="local", model="smol", key=None, prompt_tokens=2, completion_tokens=1)
              for _ in range(150)]
    await asyncio.gather(*(ledger.commit(None, e) for e in events + events[:40]))
    assert await _usage(redis, "day", "global") == {
        "requests": 150, "prompt_tokens": 300, "completion_tokens": 150, "cost_micros": 0}


async def test_group_commit_survives_redis_losing_its_scripts(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger()
    await ledger.commit(None, UsageEvent(tier="local", model="smol", key=None, prompt_tokens=1))
    await redis.script_flush()
    await asyncio.gather(*(ledger.commit(None, UsageEvent(tier="local", model="smol", key=None, prompt_tokens=1))
                           for _ in range(5)))
    assert (await _usage(redis, "day", "global"))["requests"] == 6
    assert ledger.journaled_events == 0


async def test_rpm_holds_across_two_daemons(make_ledger: MakeLedger) -> None:
    keys = [KeyConfig(name="alice", sha256=hash_key("t"), rpm=5)]
    a, b = await make_ledger(keys=keys), await make_ledger(keys=keys)
    alice = a.keys.by_name("alice")
    assert alice is not None
    results = await asyncio.gather(*[(a if i % 2 else b).admit(key=alice, tokens=1, hold=None) for i in range(12)])
    allowed = [r for r in results if r.admitted]
    limited = [r.rate_limited for r in results if r.rate_limited is not None]
    assert len(allowed) == 5 and len(limited) == 7
    assert all(r.limit == "rpm" and 0 < r.retry_after_s <= 12 for r in limited)
    # Another key has its own allowance.
    bob = KeyConfig(name="bob", sha256=hash_key("u"), rpm=5)
    c = await make_ledger(keys=[bob])
    assert (await c.admit(key=c.keys.by_name("bob"), tokens=1, hold=None)).admitted


async def test_tpm_charges_the_estimate_and_commit_corrects_it(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(keys=[KeyConfig(name="alice", sha256=hash_key("t"), tpm=100)])
    alice = ledger.keys.by_name("alice")
    assert (await ledger.admit(key=alice, tokens=60, hold=None)).admitted
    second = await ledger.admit(key=alice, tokens=60, hold=None)
    assert second.rate_limited is not None and second.rate_limited.limit == "tpm"
    # The first call used 10 tokens, not 60: the charge drops and room comes back.
    await ledger.commit(None, UsageEvent(tier="local", model="m", key="alice", prompt_tokens=5, completion_tokens=5, admitted_tokens=60))
    assert (await ledger.admit(key=alice, tokens=60, hold=None)).admitted


async def test_rate_limited_admission_holds_nothing(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger(
        budgets=_budgets(**{"global": {"daily_usd": 1.0}}),
        keys=[KeyConfig(name="alice", sha256=hash_key("t"), rpm=1)],
    )
    alice = ledger.keys.by_name("alice")
    first = await ledger.admit(key=alice, tokens=1, hold=_req(300, key="alice"))
    assert first.hold is not None and first.hold.budgets
    second = await ledger.admit(key=alice, tokens=1, hold=_req(300, key="alice"))
    assert second.rate_limited is not None and second.hold is None
    assert (await _usage(redis, "day", "global"))["held_micros"] == 300


async def _evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_no_redis_call_without_limits_or_priced_hold(make_ledger: MakeLedger, redis: Redis) -> None:
    ledger = await make_ledger(budgets=_budgets(**{"global": {"daily_usd": 1.0}}))
    before = await _evalsha_calls(redis)
    plain = await ledger.admit(key=None, tokens=10, hold=None)
    free = await ledger.admit(key=None, tokens=10, hold=_req(0, tier="local"))
    assert plain.admitted and plain.hold is None
    assert free.hold is not None and free.hold.budgets == ()
    assert await _evalsha_calls(redis) == before
    priced = await ledger.admit(key=None, tokens=10, hold=_req(5))
    assert priced.hold is not None and priced.hold.budgets
    assert await _evalsha_calls(redis) == before + 1  # one round trip, one script


async def test_reconfigure_applies_new_budgets(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(budgets=_budgets(**{"global": {"daily_usd": 0.001}}))
    assert isinstance(await ledger.reserve(_req(1000)), Hold)
    assert isinstance(await ledger.reserve(_req(1000)), Refusal)
    ledger.reconfigure(budgets=_budgets(**{"global": {"daily_usd": 0.002}}), prices=ledger.prices, keys=ledger.keys)
    assert isinstance(await ledger.reserve(_req(1000)), Hold)
    await wait_for(lambda: ledger.state == "connected")


_HOLDER = """
import asyncio, sys
from pathlib import Path
from tracking import BudgetsConfig, Hold, HoldRequest, KeyStore, Ledger, Price, PriceTable, RedisConfig

async def main():
    ledger = Ledger(
        RedisConfig(url=sys.argv[1], hold_ttl_s=0.5),
        BudgetsConfig.model_validate({"global": {"daily_usd": 0.001}}),
        PriceTable({"paid": Price(1.0, 2.0)}), KeyStore(), Path(sys.argv[2]),
    )
    await ledger.start()
    hold = await ledger.reserve(HoldRequest("paid", "m", None, 1000))
    print("held" if isinstance(hold, Hold) else "refused", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_sigkilled_daemon_holding_budget_gives_it_back(
    make_ledger: MakeLedger, redis_url: str, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, redis_url, str(tmp_path / "j.jsonl"),
        stdout=asyncio.subprocess.PIPE, cwd=str(Path(__file__).parents[2]),
    )
    try:
        assert proc.stdout is not None
        line = b"-"
        async with asyncio.timeout(60):
            while line.strip() not in (b"held", b"refused", b""):  # skip its log lines
                line = await proc.stdout.readline()
        assert line.strip() == b"held"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    ledger = await make_ledger(budgets=_budgets(**{"global": {"daily_usd": 0.001}}))
    assert isinstance(await ledger.reserve(_req(1000)), Refusal)  # still held by the dead one
    await asyncio.sleep(0.7)
    assert isinstance(await ledger.reserve(_req(1000)), Hold)
