"""Usage against budget, per scope and window, read from Redis (the shared truth).

``Ledger.report`` (for ``GET /admin/usage``) and ``fetch_report`` (for ``tiergate
usage``) build the same JSON-able dict; ``render_table`` prints it for a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tracking.config import BudgetsConfig
from tracking.keys import KeyStore
from tracking.keyspace import (
    WINDOW_KINDS,
    KeySpace,
    WindowKind,
    day_of,
    global_scope,
    key_scope,
    month_of,
    tier_scope,
    window_end,
)
from tracking.records import LedgerUnavailableError

# scope -> {"day": limit micros, "month": limit micros}
BudgetLimitsByScope = dict[str, dict[str, int]]

_COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_micros")
_SCOPE_ORDER = {"global": 0, "tier": 1, "model": 2, "key": 3}


def budget_limits(budgets: BudgetsConfig, keys: KeyStore) -> BudgetLimitsByScope:
    """Every configured budget, by scope: global, per tier, per key."""
    limits: BudgetLimitsByScope = {}
    if budgets.global_ is not None and budgets.global_.micros():
        limits[global_scope()] = budgets.global_.micros()
    for tier, tier_limits in budgets.tiers.items():
        if tier_limits.micros():
            limits[tier_scope(tier)] = tier_limits.micros()
    for name in keys.names():
        key = keys.by_name(name)
        if key is not None and key.budget_micros():
            limits[key_scope(name)] = key.budget_micros()
    return limits


def _usd(micros: int) -> float:
    return micros / 1_000_000


def _int(raw: Mapping[bytes, bytes], field: str) -> int:
    value = raw.get(field.encode())
    return int(value) if value is not None else 0


def _scope_sort_key(scope: str) -> tuple[int, str]:
    kind, _, name = scope.partition(":")
    return (_SCOPE_ORDER.get(kind, 9), name)


async def build_report(
    redis: Redis,
    space: KeySpace,
    limits: BudgetLimitsByScope,
    *,
    day: str | None = None,
    month: str | None = None,
) -> dict[str, Any]:
    """Two round trips: which scopes have usage (and the server clock), then their counters."""
    now = time.time()
    periods: dict[WindowKind, str] = {"day": day or day_of(now), "month": month or month_of(now)}
    for kind, period in periods.items():
        window_end(kind, period)  # raises ValueError for a malformed day or month

    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for kind in WINDOW_KINDS:
            pipe.smembers(space.index(kind, periods[kind]))
        first = await pipe.execute()
    server_s, server_us = first[0]
    server_ms = server_s * 1000 + server_us // 1000

    rows: list[tuple[WindowKind, str, bool]] = []  # window, scope, has a budget
    for kind, members in zip(WINDOW_KINDS, first[1:], strict=True):
        scopes = {m.decode() for m in members}
        scopes |= {scope for scope, by_window in limits.items() if kind in by_window}
        for scope in sorted(scopes, key=_scope_sort_key):
            rows.append((kind, scope, kind in limits.get(scope, {})))

    async with redis.pipeline(transaction=False) as pipe:
        for kind, scope, budgeted in rows:
            pipe.hgetall(space.usage(kind, periods[kind], scope))
            if budgeted:
                pipe.hgetall(space.held(kind, periods[kind], scope))
                pipe.zrange(space.holds(kind, periods[kind], scope), 0, -1, withscores=True)
        replies = iter(await pipe.execute())

    usage: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in WINDOW_KINDS}
    for kind, scope, budgeted in rows:
        raw = next(replies)
        entry: dict[str, Any] = {c: _int(raw, c) for c in _COUNTERS}
        entry["cost_usd"] = _usd(entry["cost_micros"])
        held = 0
        limit: int | None = None
        if budgeted:
            amounts, expiries = next(replies), next(replies)
            # Only holds whose TTL has not passed (expired ones are purged lazily).
            live = {hold_id for hold_id, expiry in expiries if expiry > server_ms}
            held = sum(int(v) for k, v in amounts.items() if k in live)
            limit = limits[scope][kind]
        entry["held_micros"] = held
        entry["held_usd"] = _usd(held)
        entry["budget_micros"] = limit
        entry["budget_usd"] = _usd(limit) if limit is not None else None
        remaining = max(0, limit - entry["cost_micros"] - held) if limit is not None else None
        entry["remaining_micros"] = remaining
        entry["remaining_usd"] = _usd(remaining) if remaining is not None else None
        usage[kind][scope] = entry

    return {
        "day": periods["day"],
        "month": periods["month"],
        "generated_at": datetime.fromtimestamp(server_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "usage": usage,
    }


async def fetch_report(
    redis_url: str,
    prefix: str,
    *,
    day: str | None = None,
    month: str | None = None,
    budgets: BudgetsConfig | None = None,
    keys: KeyStore | None = None,
    timeout_s: float = 5.0,
) -> dict[str, Any]:
    """The report straight from Redis, for the CLI. Budgets come from the config, if given."""
    limits = budget_limits(budgets or BudgetsConfig(), keys or KeyStore())
    redis = Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return await build_report(redis, KeySpace(prefix), limits, day=day, month=month)
    except (RedisError, OSError) as exc:
        raise LedgerUnavailableError(f"cannot read usage from Redis: {exc}") from exc
    finally:
        await redis.aclose()


def _money(micros: int | None) -> str:
    return "-" if micros is None else f"${micros / 1_000_000:,.4f}"


def render_table(report: Mapping[str, Any]) -> str:
    """The report as an aligned text table, one block per window."""
    header = ("SCOPE", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "COST", "HELD", "BUDGET", "LEFT")
    out: list[str] = []
    for kind in WINDOW_KINDS:
        period = report[kind]
        lines = [header]
        for scope, e in report["usage"][kind].items():
            lines.append(
                (
                    scope,
                    f"{e['requests']:,}",
                    f"{e['errors']:,}",
                    f"{e['prompt_tokens']:,}",
                    f"{e['completion_tokens']:,}",
                    _money(e["cost_micros"]),
                    _money(e["held_micros"]),
                    _money(e["budget_micros"]),
                    _money(e["remaining_micros"]),
                )
            )
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        out.append(f"{'Day' if kind == 'day' else 'Month'} {period} (UTC)")
        if len(lines) == 1:
            out.append("  no usage")
        else:
            for row in lines:
                cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
                out.append("  " + "  ".join(cells).rstrip())
        out.append("")
    return "\n".join(out).rstrip() + "\n"
