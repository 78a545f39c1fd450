"""API keys: configured by their SHA-256, looked up in constant time, never logged.

A presented bearer token is hashed once and compared with ``hmac.compare_digest``
against every configured hash, with no early exit, so the time taken does not say
which key (or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from tracking.config import KeyConfig

KEY_PREFIX = "tg-"


def hash_key(token: str) -> str:
    """The hex SHA-256 to put in ``[[keys]] sha256``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random key (256 bits); show it once, store only ``hash_key(key)``."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What a request's key allows. Holds the key's name, never the key or its hash."""

    name: str
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    daily_budget_micros: int | None = None
    monthly_budget_micros: int | None = None
    allowed_tiers: frozenset[str] | None = None  # None: any
    allowed_models: frozenset[str] | None = None

    @property
    def has_rate_limits(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def budget_micros(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.daily_budget_micros is not None:
            out["day"] = self.daily_budget_micros
        if self.monthly_budget_micros is not None:
            out["month"] = self.monthly_budget_micros
        return out

    def may_use_tier(self, name: str) -> bool:
        return self.allowed_tiers is None or name in self.allowed_tiers

    def may_use_model(self, name: str) -> bool:
        return self.allowed_models is None or name in self.allowed_models

    @classmethod
    def from_config(cls, cfg: KeyConfig) -> ApiKey:
        limits = cfg.budget.micros() if cfg.budget else {}
        return cls(
            name=cfg.name,
            admin=cfg.admin,
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            daily_budget_micros=limits.get("day"),
            monthly_budget_micros=limits.get("month"),
            allowed_tiers=frozenset(cfg.tiers) if cfg.tiers is not None else None,
            allowed_models=frozenset(cfg.models) if cfg.models is not None else None,
        )


class KeyStore:
    """The configured keys, by hash (for lookup) and by name (for budgets and reports)."""

    def __init__(self, keys: Sequence[KeyConfig] = ()) -> None:
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ValueError("key names must be unique")
        digests = [k.sha256 for k in keys]
        if len(set(digests)) != len(digests):
            raise ValueError("two keys have the same sha256")
        self._entries: list[tuple[bytes, ApiKey]] = [
            (bytes.fromhex(k.sha256), ApiKey.from_config(k)) for k in keys
        ]
        self._by_name: dict[str, ApiKey] = {key.name: key for _, key in self._entries}
        self.empty = not self._entries  # no key configured: the API is open

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._by_name)

    def by_name(self, name: str) -> ApiKey | None:
        return self._by_name.get(name)

    def lookup(self, presented_token: str) -> ApiKey | None:
        """The key a bearer token belongs to, or None; constant time in the token."""
        digest = hashlib.sha256(presented_token.encode("utf-8")).digest()
        found: ApiKey | None = None
        for stored, key in self._entries:
            # No early exit: every stored hash is compared whatever matched.
            if hmac.compare_digest(stored, digest):
                found = key
        return found
