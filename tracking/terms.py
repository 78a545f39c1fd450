"""What the ledger applies, from one config: prices, keys and budget limits."""

from __future__ import annotations

from dataclasses import dataclass

from tracking.config import BudgetsConfig
from tracking.keys import KeyStore
from tracking.pricing import PriceTable
from tracking.report import BudgetLimitsByScope, budget_limits


@dataclass(frozen=True, slots=True)
class LedgerTerms:
    """Swapped whole when the config changes; holds already made keep their scopes."""

    prices: PriceTable
    keys: KeyStore
    budget_limits: BudgetLimitsByScope

    @classmethod
    def of(cls, budgets: BudgetsConfig, prices: PriceTable, keys: KeyStore) -> LedgerTerms:
        return cls(prices=prices, keys=keys, budget_limits=budget_limits(budgets, keys))
