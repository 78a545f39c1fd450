"""What a call costs, in integer micro-dollars.

A price is USD per million tokens, so ``t`` tokens at ``P`` USD per million cost exactly
``t × P`` micro-dollars. The arithmetic is done in ``Decimal`` from the price as written
(``repr`` of the float, so ``2.5`` is exactly 2.5) and rounded up once per call: the
ledger never under-charges and never accumulates float error. A tier with no price
(the local tier, say) costs 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal


def _dec(usd_per_m: float) -> Decimal:
    return Decimal(repr(float(usd_per_m)))


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million input and output tokens, with optional per-model overrides."""

    input_usd_per_m: float = 0.0
    output_usd_per_m: float = 0.0
    models: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rates = [(self.input_usd_per_m, self.output_usd_per_m), *self.models.values()]
        for rate in rates:
            if any(r < 0 for r in rate):
                raise ValueError("prices must be >= 0")

    @property
    def is_free(self) -> bool:
        rates = [(self.input_usd_per_m, self.output_usd_per_m), *self.models.values()]
        return all(i == 0 and o == 0 for i, o in rates)

    def rates_for(self, model: str) -> tuple[float, float]:
        return self.models.get(model, (self.input_usd_per_m, self.output_usd_per_m))


class PriceTable:
    """Prices by tier name. Unknown tiers are free."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._prices: dict[str, Price] = dict(prices or {})
        self._rates: dict[tuple[str, str | None], tuple[Decimal, Decimal]] = {}
        for tier, price in self._prices.items():
            self._rates[(tier, None)] = (_dec(price.input_usd_per_m), _dec(price.output_usd_per_m))
            for model, (i, o) in price.models.items():
                self._rates[(tier, model)] = (_dec(i), _dec(o))

    def price(self, tier: str) -> Price:
        return self._prices.get(tier, Price())

    def is_priced(self, tier: str) -> bool:
        price = self._prices.get(tier)
        return price is not None and not price.is_free

    def cost_micros(self, tier: str, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        """Actual cost of a finished call, rounded up to a whole micro-dollar."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError("token counts must be >= 0")
        rates = self._rates.get((tier, model)) or self._rates.get((tier, None))
        if rates is None:
            return 0
        total = rates[0] * prompt_tokens + rates[1] * completion_tokens
        return int(total.to_integral_value(ROUND_CEILING))

    def worst_case_micros(self, tier: str, model: str, prompt_tokens: int, max_tokens: int) -> int:
        """What to hold before a call: every allowed output token gets produced."""
        return self.cost_micros(tier, model, prompt_tokens, max_tokens)
