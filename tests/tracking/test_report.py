from __future__ import annotations

import asyncio
import time

import pytest

from tracking import (
    BudgetLimits,
    BudgetsConfig,
    Hold,
    HoldRequest,
    KeyConfig,
    KeyStore,
    UsageEvent,
    fetch_report,
    LedgerUnavailableError,
    hash_key,
    render_table,
)
from tracking.keyspace import day_of, month_of

from tests.support.redis_server import free_port

from .conftest import MakeLedger

BUDGETS = BudgetsConfig.model_validate({"global": {"daily_usd": 1.0}, "tiers": {"paid": {"monthly_usd": 2.0}}})
KEYS = [KeyConfig(name="alice", sha256=hash_key("t"), budget=BudgetLimits(daily_usd=0.5))]


async def _fill(ledger_maker: MakeLedger) -> None:
    ledger = await ledger_maker(budgets=BUDGETS, keys=KEYS)
    hold = await ledger.reserve(HoldRequest("paid", "gpt", "alice", 5000))
    assert isinstance(hold, Hold)
    await ledger.commit(hold, UsageEvent(tier="paid", model="gpt", key="alice", prompt_tokens=1000, completion_tokens=500, cost_micros=2000))
    await ledger.commit(None, UsageEvent(tier="local", model="smol", key=None, prompt_tokens=10, completion_tokens=20))
    await ledger.commit(None, UsageEvent(tier="paid", model="gpt", key="alice", error=True))
    open_hold = await ledger.reserve(HoldRequest("paid", "gpt", "alice", 3000))
    assert isinstance(open_hold, Hold)


async def test_report_shows_usage_against_budget(make_ledger: MakeLedger) -> None:
    await _fill(make_ledger)
    ledger = await make_ledger(budgets=BUDGETS, keys=KEYS)  # another daemon sees the same
    report = await ledger.report()
    now = time.time()
    assert (report["day"], report["month"]) == (day_of(now), month_of(now))
    day, month = report["usage"]["day"], report["usage"]["month"]
    assert list(day) == ["global", "tier:local", "tier:paid", "model:gpt", "model:smol", "key:alice"]
    g = day["global"]
    assert (g["requests"], g["errors"], g["prompt_tokens"], g["completion_tokens"]) == (2, 1, 1010, 520)
    assert (g["cost_micros"], g["held_micros"], g["budget_micros"]) == (2000, 3000, 1_000_000)
    assert g["remaining_micros"] == 1_000_000 - 2000 - 3000 and g["cost_usd"] == 0.002
    assert day["key:alice"]["budget_micros"] == 500_000
    assert day["tier:paid"]["budget_micros"] is None  # the tier's budget is monthly
    assert month["tier:paid"]["budget_micros"] == 2_000_000
    assert month["tier:paid"]["remaining_micros"] == 2_000_000 - 5000
    assert day["tier:local"]["cost_micros"] == 0 and day["tier:local"]["held_micros"] == 0
    assert report["ledger"] == "connected"


async def test_report_ignores_expired_holds(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(budgets=BUDGETS, hold_ttl_s=0.05)
    assert isinstance(await ledger.reserve(HoldRequest("paid", "gpt", None, 700)), Hold)
    await asyncio.sleep(0.1)
    report = await ledger.report()
    assert report["usage"]["day"]["global"]["held_micros"] == 0


async def test_report_lists_budgets_with_no_usage_yet(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger(budgets=BUDGETS, keys=KEYS)
    report = await ledger.report(day="2001-02-03", month="2001-02")
    assert list(report["usage"]["day"]) == ["global", "key:alice"]
    assert report["usage"]["day"]["global"]["remaining_micros"] == 1_000_000
    assert list(report["usage"]["month"]) == ["tier:paid"]


async def test_fetch_report_and_table_for_the_cli(make_ledger: MakeLedger, redis_url: str) -> None:
    await _fill(make_ledger)
    report = await fetch_report(redis_url, "tiergate", budgets=BUDGETS, keys=KeyStore(KEYS))
    assert report["usage"]["day"]["global"]["remaining_micros"] == 995_000
    table = render_table(report)
    lines = table.splitlines()
    assert lines[0] == f"Day {report['day']} (UTC)"
    header = lines[1].split()
    assert header == ["SCOPE", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "COST", "HELD", "BUDGET", "LEFT"]
    global_row = next(line for line in lines if line.strip().startswith("global"))
    assert global_row.split() == ["global", "2", "1", "1,010", "520", "$0.0020", "$0.0030", "$1.0000", "$0.9950"]
    assert any(line.strip().startswith("model:smol") for line in lines)
    assert f"Month {report['month']} (UTC)" in lines


async def test_empty_report_renders(redis_url: str) -> None:
    report = await fetch_report(redis_url, "tiergate")
    assert report["usage"] == {"day": {}, "month": {}}
    assert render_table(report).count("no usage") == 2


async def test_fetch_report_without_redis_says_so() -> None:
    with pytest.raises(LedgerUnavailableError):
        await fetch_report(f"redis://127.0.0.1:{free_port()}/0", "tiergate", timeout_s=0.5)
    assert issubclass(LedgerUnavailableError, ConnectionError)  # what the CLI catches
