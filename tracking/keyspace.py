"""The Redis key layout, and the UTC calendar windows it is cut into.

Every key starts with ``[redis] key_prefix`` (``P``, default ``tiergate``). A window is
``d:YYYY-MM-DD`` (UTC day) or ``m:YYYY-MM`` (UTC month). A scope is ``global``,
``tier:<name>``, ``model:<name>`` or ``key:<name>``; the scope comes last because model
names may contain colons.

====================================  ======  ===============================================
key                                   type    content
====================================  ======  ===============================================
``P:usage:<window>:<scope>``          HASH    ``requests`` (calls that succeeded), ``errors``
                                              (calls that failed), ``prompt_tokens``,
                                              ``completion_tokens``, ``cost_micros`` (what
                                              was spent: the budget's "spent"), and for
                                              budgeted scopes ``held_micros`` (sum of open
                                              holds, expired ones included until purged).
                                              Expires at window end + ``retention_days``.
``P:holds:<window>:<scope>``          ZSET    open hold ids scored by their expiry (Redis
                                              server time, ms). Same expiry as usage.
``P:held:<window>:<scope>``           HASH    hold id -> micro-dollars held. Same expiry.
``P:index:<window>``                  SET     scopes that have usage in the window (what
                                              the report lists). Same expiry.
``P:events:<YYYY-MM-DD>``             SET     ids of usage events counted that day (replay
                                              is exactly-once). Expires at day end +
                                              ``dedupe_days``.
``P:rate:<key name>:rpm`` / ``:tpm``  STRING  GCRA theoretical arrival time (server ms);
                                              expires when the bucket is full again.
====================================  ======  ===============================================

Holds purge lazily: before checking a budget, the admit script drops the holds of that
(scope, window) whose expiry has passed and gives their amount back; reports leave
expired holds out of ``held``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal

WindowKind = Literal["day", "month"]
WINDOW_KINDS: tuple[WindowKind, ...] = ("day", "month")
_TAG: dict[WindowKind, str] = {"day": "d", "month": "m"}

DAY_S = 86_400


@lru_cache(maxsize=16)
def calendar_of_day(day_number: int) -> tuple[str, str]:
    """(``YYYY-MM-DD``, ``YYYY-MM``) of UTC day ``day_number`` (unix seconds // 86400).

    Unix time has no leap seconds, so every UTC day starts at a multiple of 86400:
    events are dated by an integer division and this cache, not a datetime each.
    """
    start = datetime.fromtimestamp(day_number * DAY_S, UTC)
    return start.strftime("%Y-%m-%d"), start.strftime("%Y-%m")


def day_of(ts: float) -> str:
    return calendar_of_day(int(ts // DAY_S))[0]


def month_of(ts: float) -> str:
    return calendar_of_day(int(ts // DAY_S))[1]


@lru_cache(maxsize=64)
def window_end(kind: WindowKind, period: str) -> int:
    """Unix seconds when the window closes (the next UTC midnight or month start)."""
    if kind == "day":
        start = datetime.strptime(period, "%Y-%m-%d").replace(tzinfo=UTC)
        return int((start + timedelta(days=1)).timestamp())
    start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def global_scope() -> str:
    return "global"


def tier_scope(name: str) -> str:
    return f"tier:{name}"


def model_scope(name: str) -> str:
    return f"model:{name}"


def key_scope(name: str) -> str:
    return f"key:{name}"


class KeySpace:
    """Builds every key the ledger uses; the only place that knows the layout."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def window(self, kind: WindowKind, period: str) -> str:
        return f"{_TAG[kind]}:{period}"

    def usage(self, kind: WindowKind, period: str, scope: str) -> str:
        return f"{self.prefix}:usage:{self.window(kind, period)}:{scope}"

    def holds(self, kind: WindowKind, period: str, scope: str) -> str:
        return f"{self.prefix}:holds:{self.window(kind, period)}:{scope}"

    def held(self, kind: WindowKind, period: str, scope: str) -> str:
        return f"{self.prefix}:held:{self.window(kind, period)}:{scope}"

    def index(self, kind: WindowKind, period: str) -> str:
        return f"{self.prefix}:index:{self.window(kind, period)}"

    def events(self, day: str) -> str:
        return f"{self.prefix}:events:{day}"

    def rate(self, key_name: str, limit: Literal["rpm", "tpm"]) -> str:
        return f"{self.prefix}:rate:{key_name}:{limit}"
