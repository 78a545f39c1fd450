from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tracking import BudgetsConfig, KeyConfig, KeyStore, Ledger, Price, PriceTable, RedisConfig

# "paid": 1 micro-dollar per prompt token, 2 per completion token. "local": free.
PRICES = PriceTable({"paid": Price(1.0, 2.0), "paid2": Price(1.0, 2.0), "local": Price()})

MakeLedger = Callable[..., Awaitable[Ledger]]


@pytest.fixture
async def make_ledger(redis_url: str, tmp_path: Path) -> AsyncIterator[MakeLedger]:
    """Start Ledgers as separate daemons would: each its own pool and journal."""
    ledgers: list[Ledger] = []

    async def make(
        *,
        budgets: BudgetsConfig | None = None,
        keys: Sequence[KeyConfig] = (),
        prices: PriceTable = PRICES,
        journal: Path | None = None,
        **redis: Any,
    ) -> Ledger:
        config = RedisConfig(
            url=redis.pop("url", redis_url), reconnect_min_s=0.05, reconnect_max_s=0.2, **redis
        )
        ledger = Ledger(
            config,
            budgets or BudgetsConfig(),
            prices,
            KeyStore(keys),
            journal or tmp_path / f"journal-{len(ledgers)}.jsonl",
        )
        await ledger.start()
        ledgers.append(ledger)
        return ledger

    yield make
    for ledger in ledgers:
        await ledger.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
