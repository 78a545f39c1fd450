"""Daemon-side CPU per usage record: what counting one free-tier call costs the event loop.

A private redis-server (never the machine's 6379) takes the usage; this process builds
one ``UsageEvent`` per simulated call, hands it to the ledger the way the router does,
and measures its own CPU time (``time.process_time``), the batch flushes included, over
the number of events (the tick loop's own cost, measured alone first, is subtracted).
Redis's CPU is not counted: it runs in its own process.

Two load shapes:

- ``paced``: ``--rate`` calls per second, emitted every millisecond as a daemon serving
  that rate would (small batches: the per-flush cost is shared by few events);
- ``saturated``: bursts of 32 as fast as the loop goes (large batches).

Two ways in:

- ``record``: ``ledger.record(event)`` (no task, no await; the batch flush is amortised);
- ``commit``: ``spawn(ledger.commit(None, event))``, the router's way before ``record``;
- ``build``: only build the event (no ledger), the floor the other two include.

    .venv/bin/python bench/ledger_record.py                   # both ways, both shapes
    .venv/bin/python bench/ledger_record.py --mode record --rate 4000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.redis_server import start_redis  # noqa: E402
from tracking import BudgetsConfig, KeyStore, Ledger, PriceTable, RedisConfig, UsageEvent  # noqa: E402


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _event(i: int, *, old_style: bool) -> UsageEvent:
    if old_style:  # as the router built it before: a uuid4 and a clock read per event
        return UsageEvent(
            id=uuid.uuid4().hex, tier="openai", model="gpt-4o-mini", key=None,
            prompt_tokens=12, completion_tokens=i % 50, cost_micros=0, ts=time.time(),
        )
    return UsageEvent(tier="openai", model="gpt-4o-mini", key=None, prompt_tokens=12, completion_tokens=i % 50)


async def _tick_loop(n: int, rate: int, emit: Any) -> None:
    """Emit ``n`` events: ``rate`` per second by the clock, ticking every millisecond
    (``rate`` 0: bursts of 32 as fast as the loop goes)."""
    i, start = 0, time.monotonic()
    while i < n:
        due = min(n, int((time.monotonic() - start) * rate) + 1) if rate else min(n, i + 32)
        while i < due:
            emit(i)
            i += 1
        await asyncio.sleep(0.001 if rate else 0)


async def measure(url: str, workdir: Path, mode: str, shape: str, n: int, rate: int) -> float:
    ledger = Ledger(
        RedisConfig(url=url), BudgetsConfig(), PriceTable({}), KeyStore(), workdir / f"j-{mode}-{shape}.jsonl"
    )
    await ledger.start()
    rate = rate if shape == "paced" else 0
    tasks: set[asyncio.Task[None]] = set()
    record = getattr(ledger, "record", None)

    if mode == "build":

        def emit(i: int) -> None:
            _event(i, old_style=False)
    elif mode == "record":
        if record is None:
            raise SystemExit("this tracking has no Ledger.record")

        def emit(i: int) -> None:
            record(_event(i, old_style=False))
    else:

        def emit(i: int) -> None:
            task = asyncio.get_running_loop().create_task(ledger.commit(None, _event(i, old_style=True)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    # Warm up (script load, connections), then the loop alone, then with events.
    await _tick_loop(2000, rate, emit)
    while tasks:
        await asyncio.gather(*list(tasks))
    await asyncio.sleep(0.05)
    start = time.process_time()
    await _tick_loop(n, rate, lambda i: None)
    idle = time.process_time() - start

    start = time.process_time()
    await _tick_loop(n, rate, emit)
    while tasks:
        await asyncio.gather(*list(tasks))
    await asyncio.sleep(0.02)  # the last batch's flush
    used = time.process_time() - start - idle
    await ledger.aclose()
    if ledger.journaled_events:
        raise SystemExit(f"{ledger.journaled_events} events went to the journal: Redis failed")
    return used / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["record", "commit", "build", "both"], default="both")
    parser.add_argument("--shape", choices=["paced", "saturated", "both"], default="both")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=2000, help="calls per second (paced)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    modes = ["commit", "record"] if args.mode == "both" else [args.mode]
    shapes = ["paced", "saturated"] if args.shape == "both" else [args.shape]
    redis = start_redis()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for shape in shapes:
                for mode in modes:
                    figures = [
                        await measure(redis.url, Path(tmp), mode, shape, args.events, args.rate)
                        for _ in range(args.rounds)
                    ]
                    label = f"{shape} {args.rate}/s" if shape == "paced" else shape
                    print(f"{mode:7s} {label:14s} us/event: min {min(figures):6.1f}  "
                          f"median {sorted(figures)[len(figures) // 2]:6.1f}", flush=True)
    finally:
        redis.stop()


if __name__ == "__main__":
    _run_loop(main())
