"""KEYS and ARGV of the ledger's Lua scripts (``tracking/lua``), built from plain values.

``admit.lua`` (rate limits and an all-or-nothing hold), ``commit.lua`` (settle a hold,
count one event), ``release.lua`` (give a hold back). ``commit_batch.lua``'s call is
built by ``tracking.batch``. The key layout itself is ``tracking.keyspace``'s.
"""

from __future__ import annotations

import json

from tracking.config import RedisConfig
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
from tracking.records import Hold, HoldRequest, UsageEvent

# (scope, window, limit in micro-dollars) of one budget a hold must fit in.
Budget = tuple[str, WindowKind, int]
ScriptCall = tuple[list[str], list[str | int]]


def admit_call(
    space: KeySpace,
    config: RedisConfig,
    key: ApiKey | None,
    tokens: int,
    hold: HoldRequest | None,
    hold_id: str,
    budgets: list[Budget],
    day: str,
    month: str,
) -> ScriptCall:
    """``admit.lua``: the key's rpm/tpm (``key`` None: no limits) and ``hold`` in every
    one of ``budgets`` for the day and month given."""
    name = key.name if key is not None else "-"
    keys = [space.rate(name, "rpm"), space.rate(name, "tpm")]
    args: list[str | int] = [
        (key.rpm or 0) if key else 0,
        (key.tpm or 0) if key else 0,
        max(tokens, 0),
        hold_id if budgets else "",
        hold.amount_micros if hold is not None else 0,
        int(config.hold_ttl_s * 1000),
    ]
    for scope, kind, limit in budgets:
        period = day if kind == "day" else month
        keys += [
            space.usage(kind, period, scope),
            space.holds(kind, period, scope),
            space.held(kind, period, scope),
        ]
        args += [limit, window_end(kind, period) + config.retention_days * DAY_S]
    return keys, args


def hold_keys(space: KeySpace, hold: Hold) -> list[str]:
    """The usage, holds and held keys of every (scope, window) ``hold`` is held in."""
    keys: list[str] = []
    for scope, kind in hold.budgets:
        period = hold.day if kind == "day" else hold.month
        keys += [space.usage(kind, period, scope), space.holds(kind, period, scope),
                 space.held(kind, period, scope)]
    return keys


def commit_call(
    space: KeySpace, config: RedisConfig, hold: Hold | None, event: UsageEvent,
    live_keys: KeyStore | None,
) -> ScriptCall:
    """``commit.lua``: settle ``hold`` (if any) and count ``event`` once, in its own day
    and month. ``live_keys`` for a fresh event: its key's tokens-per-minute charge is
    corrected to the actual tokens. None for a replayed one (its minute is long gone)."""
    day, month = day_of(event.ts), month_of(event.ts)
    scopes = [global_scope(), tier_scope(event.tier), model_scope(event.model)]
    tpm, tpm_delta = 0, 0
    if event.key is not None:
        scopes.append(key_scope(event.key))
        api_key = live_keys.by_name(event.key) if live_keys is not None else None
        if api_key is not None and api_key.tpm and event.admitted_tokens is not None:
            tpm = api_key.tpm
            tpm_delta = event.prompt_tokens + event.completion_tokens - event.admitted_tokens
    held = hold_keys(space, hold) if hold is not None else []
    periods: list[tuple[WindowKind, str]] = [("day", day), ("month", month)]
    retention_s = config.retention_days * DAY_S
    usage_keys = [space.usage(kind, period, s) for kind, period in periods for s in scopes]
    usage_expiry = [window_end(kind, period) + retention_s for kind, period in periods for _ in scopes]
    index_keys = [space.index(kind, period) for kind, period in periods]
    index_expiry = [window_end(kind, period) + retention_s for kind, period in periods]
    keys = [space.events(day), space.rate(event.key or "-", "tpm"), *held, *usage_keys, *index_keys]
    args: list[str | int] = [
        event.id,
        hold.id if hold is not None and hold.budgets else "",
        len(held) // 3,
        len(usage_keys),
        len(index_keys),
        event.prompt_tokens,
        event.completion_tokens,
        event.cost_micros,
        1 if event.error else 0,
        window_end("day", day) + config.dedupe_days * DAY_S,
        tpm,
        tpm_delta,
        json.dumps(scopes),
        *usage_expiry,
        *index_expiry,
    ]
    return keys, args
