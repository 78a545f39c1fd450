"""tiergate's Redis ledger: pricing, API keys, rate limits, budgets, usage, journal.

The surface the gateway uses, re-exported here: the config sections, keys and prices,
the values exchanged with the ledger, ``Ledger`` itself and the ``UsageLedger`` protocol
the router sees it through, and the usage report. The machinery lives in the modules
behind it (see tracking/README.md).
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
from tracking.connection import LedgerState
from tracking.keys import ApiKey, KeyStore, generate_key, hash_key
from tracking.ledger import Ledger
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
from tracking.report import fetch_report, render_table

__all__ = [
    "Admission",
    "ApiKey",
    "BudgetLimits",
    "BudgetsConfig",
    "Hold",
    "HoldRequest",
    "KeyConfig",
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
    "fetch_report",
    "generate_key",
    "hash_key",
    "new_event_id",
    "render_table",
]
