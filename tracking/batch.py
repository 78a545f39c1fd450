"""A batch of usage events (no holds) summed into one ``commit_batch.lua`` call.

Events are first summed per (UTC day, tier, model, key, error): one dict update per
event. Those few groups are then spread over the scopes (``global``, ``tier:``,
``model:``, ``key:``) and windows (the event's own day and month), so a batch that
straddles midnight or a month's end counts each event in its own windows. An id seen
twice in one batch is the same event and counts once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Sequence

import hiredis
import structlog
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from tracking.keyspace import (
    DAY_S,
    KeySpace,
    WindowKind,
    calendar_of_day,
    global_scope,
    key_scope,
    model_scope,
    tier_scope,
    window_end,
)
from tracking.records import UsageEvent

log = structlog.get_logger(__name__)

# (day number, tier, model, key, error) -> [events, prompt, completion, cost]
_Groups = dict[tuple[int, str, str, str | None, bool], list[int]]


def batch_call(
    space: KeySpace,
    events: Sequence[UsageEvent],
    *,
    tpm_of: Callable[[str], int],
    retention_days: int,
    dedupe_days: int,
) -> tuple[list[str], str]:
    """KEYS and the one argument (JSON) of a ``commit_batch.lua`` call counting ``events``.

    ``tpm_of(key name)`` is the key's tokens-per-minute limit (0: none); events that
    carry ``admitted_tokens`` correct that charge, summed per key.
    """
    groups: _Groups = {}
    ids_by_day: dict[int, list[str]] = {}
    seen: set[str] = set()
    tpm_delta: dict[str, int] = {}
    for event in events:
        event_id = event.id
        if event_id in seen:
            continue
        seen.add(event_id)
        day = int(event.ts // DAY_S)
        ids = ids_by_day.get(day)
        if ids is None:
            ids = ids_by_day[day] = []
        ids.append(event_id)
        group = (day, event.tier, event.model, event.key, event.error)
        sums = groups.get(group)
        if sums is None:
            groups[group] = [1, event.prompt_tokens, event.completion_tokens, event.cost_micros]
        else:
            sums[0] += 1
            sums[1] += event.prompt_tokens
            sums[2] += event.completion_tokens
            sums[3] += event.cost_micros
        if event.admitted_tokens is not None and event.key is not None:
            delta = event.prompt_tokens + event.completion_tokens - event.admitted_tokens
            tpm_delta[event.key] = tpm_delta.get(event.key, 0) + delta

    # usage hash key -> [requests, errors, prompt, completion, cost, expiry]
    usage: dict[str, list[int]] = {}
    # index set key -> (expiry, scopes in first-seen order)
    index: dict[str, tuple[int, dict[str, None]]] = {}
    retention_s = retention_days * DAY_S
    for (day, tier, model, key, error), (count, prompt, completion, cost) in groups.items():
        scopes = [global_scope(), tier_scope(tier), model_scope(model)]
        if key is not None:
            scopes.append(key_scope(key))
        day_str, month_str = calendar_of_day(day)
        windows: tuple[tuple[WindowKind, str], ...] = (("day", day_str), ("month", month_str))
        for kind, period in windows:
            expiry = window_end(kind, period) + retention_s
            index_key = space.index(kind, period)
            if index_key not in index:
                index[index_key] = (expiry, {})
            index_scopes = index[index_key][1]
            for scope in scopes:
                index_scopes[scope] = None
                usage_key = space.usage(kind, period, scope)
                sums = usage.get(usage_key)
                if sums is None:
                    sums = usage[usage_key] = [0, 0, 0, 0, 0, expiry]
                sums[1 if error else 0] += count
                sums[2] += prompt
                sums[3] += completion
                sums[4] += cost

    rates = [(name, tpm, delta) for name, delta in tpm_delta.items() if delta and (tpm := tpm_of(name))]
    keys: list[str] = [space.events(calendar_of_day(day)[0]) for day in ids_by_day]
    keys += usage
    keys += index
    keys += [space.rate(name, "tpm") for name, _, _ in rates]
    payload = [
        [
            [window_end("day", calendar_of_day(day)[0]) + dedupe_days * DAY_S, ids]
            for day, ids in ids_by_day.items()
        ],
        list(usage.values()),
        [[expiry, list(index_scopes)] for expiry, index_scopes in index.values()],
        [[tpm, delta] for _, tpm, delta in rates],
    ]
    return keys, json.dumps(payload, separators=(",", ":"))


class BatchConnection:
    """A connection of the ledger's own that runs ``commit_batch.lua``.

    One batch is in flight at a time, so it needs no pool; and it skips the client
    layer, whose cost per command was most of a batch's. It connects on first use
    and again after any failure (redis-py drops a connection whose exchange failed).
    """

    def __init__(self, pool: ConnectionPool, script: str, *, timeout_s: float) -> None:
        # No socket timeout of its own: one deadline covers connect, send and reply.
        self._connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        self._timeout_s = timeout_s

    async def count(self, keys: Sequence[str], payload: str) -> bool:
        """Run the script; False if some id was counted before (nothing changed).

        Raises ``TimeoutError`` or redis-py's errors when Redis fails; the batch may
        or may not have been counted then.
        """
        command = hiredis.pack_command(("EVALSHA", self._sha, len(keys), *keys, payload))
        connection = self._connection
        async with asyncio.timeout(self._timeout_s):
            if not connection.is_connected:
                return await self._run(command)
            try:
                return await self._run(command)
            except (RedisConnectionError, OSError) as exc:
                # A connection left idle across a Redis restart fails on first use.
                # The script counts ids once, so sending the batch again is safe.
                log.debug("usage_batch_reconnect", error=str(exc))
                return await self._run(command)

    async def _run(self, command: bytes) -> bool:
        connection = self._connection
        await connection.send_packed_command(command, check_health=False)
        try:
            reply = await connection.read_response()
        except NoScriptError:  # Redis restarted or flushed its scripts
            await connection.send_command("SCRIPT", "LOAD", self._script, check_health=False)
            await connection.read_response()
            await connection.send_packed_command(command, check_health=False)
            reply = await connection.read_response()
        return int(reply) == 1

    async def aclose(self) -> None:
        await self._connection.disconnect()
