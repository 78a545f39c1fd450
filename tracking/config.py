"""What the TOML says to the ledger: ``[redis]``, ``[budgets]`` and ``[[keys]]``.

Pydantic at the edge; the ledger turns these into plain frozen dataclasses
(``ApiKey``, budget limits in integer micro-dollars) once, at construction.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OnUnavailable = Literal["fail_closed", "fail_open"]

MICROS_PER_USD = 1_000_000


def usd_to_micros(usd: float) -> int:
    """A budget limit in micro-dollars, rounded down (a limit never grows by rounding)."""
    return int((Decimal(repr(usd)) * MICROS_PER_USD).to_integral_value(ROUND_FLOOR))


class RedisConfig(BaseModel):
    """``[redis]``: where the shared ledger lives and what to do without it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "redis://127.0.0.1:6379/0"
    # fail_closed: free tiers serve and journal; priced tiers are refused.
    # fail_open: priced tiers serve too (no budget check) and journal their usage.
    on_unavailable: OnUnavailable = "fail_closed"
    key_prefix: str = Field("tiergate", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Usage counters live this long after their window (day, month) closes.
    retention_days: int = Field(40, ge=1)
    # Event ids (exactly-once replay) are remembered this long after their day closes;
    # a journal older than this may count twice what it had already counted.
    dedupe_days: int = Field(7, ge=1)
    # A hold not settled within this time returns to the budget (a daemon that died).
    # Keep it above the longest request deadline of a priced tier.
    hold_ttl_s: float = Field(900.0, gt=0)
    # None: the gateway passes <state dir>/usage-journal.jsonl.
    journal: Path | None = None
    socket_timeout_s: float = Field(1.0, gt=0)
    connect_timeout_s: float = Field(1.0, gt=0)
    max_connections: int = Field(64, ge=1)
    # How long a call waits for a free pooled connection when all are busy.
    pool_timeout_s: float = Field(2.0, gt=0)
    reconnect_min_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis url must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> RedisConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class BudgetLimits(BaseModel):
    """USD per UTC calendar window; either may be left out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    daily_usd: float | None = Field(None, ge=0)
    monthly_usd: float | None = Field(None, ge=0)

    def micros(self) -> dict[str, int]:
        """``{"day": limit, "month": limit}`` for the windows that are set."""
        out: dict[str, int] = {}
        if self.daily_usd is not None:
            out["day"] = usd_to_micros(self.daily_usd)
        if self.monthly_usd is not None:
            out["month"] = usd_to_micros(self.monthly_usd)
        return out


class BudgetsConfig(BaseModel):
    """``[budgets]``: ``global = {...}`` and ``tiers.<name> = {...}``; key budgets sit on the keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    global_: BudgetLimits | None = Field(None, alias="global")
    tiers: dict[str, BudgetLimits] = Field(default_factory=dict)


class KeyConfig(BaseModel):
    """One ``[[keys]]`` entry. The key itself is never in the file, only its SHA-256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", repr=False)
    admin: bool = False
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    budget: BudgetLimits | None = None
    tiers: list[str] | None = None
    models: list[str] | None = None

    @field_validator("sha256")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()
