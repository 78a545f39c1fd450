from __future__ import annotations

import pytest

from tracking import Price, PriceTable, usd_to_micros


def test_cost_is_tokens_times_price_in_micros() -> None:
    table = PriceTable({"openai": Price(2.5, 10.0)})
    assert table.cost_micros("openai", "gpt-4o", 1000, 500) == 2500 + 5000


def test_cost_uses_decimal_not_float() -> None:
    # 0.7 * 10 is 7.000000000000001 in floats; a float ceiling would charge 8.
    table = PriceTable({"t": Price(0.7, 0.0)})
    assert table.cost_micros("t", "m", 10, 0) == 7


def test_fractional_micros_round_up_once_per_call() -> None:
    table = PriceTable({"t": Price(0.15, 0.6)})
    # 7 * 0.15 + 3 * 0.6 = 1.05 + 1.8 = 2.85 -> 3 (not 2 + 2 = 4 by rounding each side)
    assert table.cost_micros("t", "m", 7, 3) == 3


def test_per_model_override() -> None:
    table = PriceTable({"openai": Price(1.0, 1.0, models={"gpt-big": (30.0, 60.0)})})
    assert table.cost_micros("openai", "gpt-big", 10, 10) == 300 + 600
    assert table.cost_micros("openai", "gpt-small", 10, 10) == 20


def test_unpriced_and_unknown_tiers_are_free() -> None:
    table = PriceTable({"local": Price(), "openai": Price(0.0, 0.0, models={"x": (1.0, 0.0)})})
    assert table.cost_micros("local", "m", 10_000, 10_000) == 0
    assert table.cost_micros("nowhere", "m", 10_000, 10_000) == 0
    assert not table.is_priced("local")
    assert not table.is_priced("nowhere")
    assert table.is_priced("openai")  # a priced override makes the tier priced


def test_worst_case_charges_every_allowed_output_token() -> None:
    table = PriceTable({"openai": Price(2.0, 8.0)})
    assert table.worst_case_micros("openai", "m", 100, 1000) == 200 + 8000


def test_negative_prices_and_tokens_are_rejected() -> None:
    with pytest.raises(ValueError):
        Price(-1.0, 0.0)
    with pytest.raises(ValueError):
        PriceTable({"t": Price(1.0, 1.0)}).cost_micros("t", "m", -1, 0)


def test_budget_limits_round_down_to_micros() -> None:
    assert usd_to_micros(0.1) == 100_000
    assert usd_to_micros(12.3456789) == 12_345_678
