"""tiergate's Redis ledger: pricing, API keys, rate limits, budgets, usage, journal.

The public surface is re-exported here; the machinery lives in the modules behind it
(``ledger``, ``keyspace`` for the Redis key layout, ``journal``, ``report``).
"""

from tracking.base import UsageLedger
from tracking.config import (
    BudgetLimits,
    BudgetsConfig,
    KeyConfig,
    OnUnavailable,
    RedisConfig,
    usd_to_micros,
)
from tracking.keys import ApiKey, KeyStore, generate_key, hash_key
from tracking.keyspace import KeySpace, WindowKind
from tracking.ledger import Ledger, LedgerState
from tracking.pricing import Price, PriceTable
from tracking.records import (
    Admission,
    Hold,
    HoldRequest,
    LedgerUnavailableError,
    RateLimited,
    Refusal,
    Scopes,
    UsageEvent,
    new_event_id,
)
from tracking.report import budget_limits, fetch_report, render_table

__all__ = [
    "Admission",
    "ApiKey",
    "BudgetLimits",
    "BudgetsConfig",
    "Hold",
    "HoldRequest",
    "KeyConfig",
    "KeySpace",
    "KeyStore",
    "Ledger",
    "LedgerState",
    "LedgerUnavailableError",
    "OnUnavailable",
    "Price",
    "PriceTable",
    "RateLimited",
    "RedisConfig",
    "Refusal",
    "Scopes",
    "UsageEvent",
    "UsageLedger",
    "WindowKind",
    "budget_limits",
    "fetch_report",
    "generate_key",
    "hash_key",
    "new_event_id",
    "render_table",
    "usd_to_micros",
]
