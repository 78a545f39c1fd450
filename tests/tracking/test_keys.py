from __future__ import annotations

import hashlib
import hmac

import pytest
from pydantic import ValidationError

from tracking import BudgetLimits, BudgetsConfig, KeyConfig, KeyStore, generate_key, hash_key
from tracking import keys as keys_module


def _cfg(name: str, token: str, **kw: object) -> KeyConfig:
    return KeyConfig(name=name, sha256=hash_key(token), **kw)  # type: ignore[arg-type]


def test_hash_key_is_hex_sha256() -> None:
    assert hash_key("secret") == hashlib.sha256(b"secret").hexdigest()


def test_generated_keys_are_distinct_and_long() -> None:
    a, b = generate_key(), generate_key()
    assert a != b and a.startswith("tg-") and len(a) >= 40


def test_lookup_finds_the_key_and_its_policy() -> None:
    store = KeyStore(
        [
            _cfg("alice", "tok-a", rpm=10, tiers=["local"], budget=BudgetLimits(daily_usd=1.5)),
            _cfg("ops", "tok-o", admin=True),
        ]
    )
    alice = store.lookup("tok-a")
    assert alice is not None and alice.name == "alice" and not alice.admin
    assert alice.rpm == 10 and alice.daily_budget_micros == 1_500_000
    assert alice.may_use_tier("local") and not alice.may_use_tier("openai")
    assert alice.may_use_model("anything")  # models not restricted
    ops = store.lookup("tok-o")
    assert ops is not None and ops.admin


def test_unknown_or_empty_token_is_refused() -> None:
    store = KeyStore([_cfg("alice", "tok-a")])
    assert store.lookup("tok-b") is None
    assert store.lookup("") is None
    assert KeyStore().empty and KeyStore().lookup("tok-a") is None


def test_uppercase_hash_in_config_still_matches() -> None:
    store = KeyStore([KeyConfig(name="a", sha256=hash_key("t").upper())])
    assert store.lookup("t") is not None


def test_lookup_compares_every_key_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    store = KeyStore([_cfg(f"k{i}", f"tok-{i}") for i in range(5)])
    assert store.lookup("tok-0") is not None  # the first key matches...
    assert len(calls) == 5  # ...and all five were still compared


def test_key_hash_never_shows_in_repr() -> None:
    cfg = _cfg("alice", "tok-a")
    store = KeyStore([cfg])
    assert cfg.sha256 not in repr(cfg)
    assert cfg.sha256 not in repr(store.lookup("tok-a"))


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError):
        KeyStore([_cfg("a", "t1"), _cfg("a", "t2")])


def test_budgets_toml_shape() -> None:
    budgets = BudgetsConfig.model_validate(
        {"global": {"daily_usd": 10, "monthly_usd": 200}, "tiers": {"openai": {"daily_usd": 5}}}
    )
    assert budgets.global_ is not None and budgets.global_.micros() == {
        "day": 10_000_000,
        "month": 200_000_000,
    }
    assert budgets.tiers["openai"].micros() == {"day": 5_000_000}
    with pytest.raises(ValidationError):
        BudgetsConfig.model_validate({"global": {"weekly_usd": 1}})
    with pytest.raises(ValidationError):
        KeyConfig(name="a", sha256="not-a-hash")
