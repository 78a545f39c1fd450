"""A generation: everything built from one validated config, never changed once built.

Its config, API keys, prices, tiers (with their health), policy and router. Handlers
read the runtime's current generation once per request and use only that one, so a
reload is building a new generation and swapping the runtime's pointer
(``Runtime.swap``): requests in flight finish on the generation they started with.
Providers are not the generation's own: it takes them from the process's pool
(``gateway.runtime.ProviderPool``), which keeps one per tier config, so a generation
built from an edited file reuses every tier the edit left alone.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from gateway.config import Config
from gateway.health import TierHealth
from gateway.router import Router
from gateway.routing import Tier
from gateway.tasks import BackgroundTasks
from policies.registry import load_policy
from providers.base import Provider
from providers.config import TierConfig
from providers.registry import MissingKey
from tracking import KeyStore, Price, PriceTable, UsageLedger

log = structlog.get_logger(__name__)

# Where a generation gets a tier's provider: the process's pool (``MissingKey`` when the
# tier needs a key and has none).
ProviderFor = Callable[[TierConfig], Provider]


def price_table(tiers: tuple[TierConfig, ...]) -> PriceTable:
    return PriceTable(
        {
            t.name: Price(
                input_usd_per_m=t.price.input,
                output_usd_per_m=t.price.output,
                models={m: (p.input, p.output) for m, p in t.price.models.items()},
            )
            for t in tiers
        }
    )


class Generation:
    """One config, built: ``config``, ``keys``, ``prices``, ``tiers``, ``policy``,
    ``router``, and ``disabled`` (tiers that do not serve, and why)."""

    def __init__(
        self,
        config: Config,
        *,
        provider_for: ProviderFor,
        ledger: UsageLedger,
        background: BackgroundTasks,
    ) -> None:
        self.config = config
        self.keys = KeyStore(config.keys)
        self.prices = price_table(config.tiers)
        self.policy = load_policy(config.routing.policy)
        self.disabled: dict[str, str] = {}
        tiers: list[Tier] = []
        for position, cfg in enumerate(config.tiers):
            if not cfg.enabled:
                self.disabled[cfg.name] = "disabled in config"
                continue
            try:
                provider = provider_for(cfg)
            except MissingKey as exc:
                self.disabled[cfg.name] = str(exc)
                continue
            health = TierHealth(
                failures_to_open=config.routing.circuit_failures,
                reset_after_s=config.routing.circuit_reset_s,
            )
            tiers.append(Tier.build(cfg, provider, health, position=position,
                                    priced=self.prices.is_priced(cfg.name)))
        self.tiers = {t.name: t for t in tiers}
        self.router = Router(
            tiers=tiers,
            policy=self.policy,
            routing=config.routing,
            ledger=ledger,
            prices=self.prices,
            background=background,
        )

    @property
    def providers(self) -> dict[str, Provider]:
        """The providers this generation serves with, by tier name."""
        return {name: t.provider for name, t in self.tiers.items()}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """(whether a chat tier can serve now, each tier's state) for /readyz."""
        tiers: dict[str, object] = {}
        usable = False
        for name, tier in self.tiers.items():
            status = tier.provider.status()
            state = tier.health.state
            info: dict[str, object] = {"kind": tier.cfg.kind, "task": tier.cfg.task,
                                       "ready": status.ready, "circuit": state}
            if status.error:
                info["error"] = status.error
            if status.active is not None:
                info["active"] = status.active
            if status.waiting is not None:
                info["waiting"] = status.waiting
            info["in_flight"] = tier.health.in_flight
            tiers[name] = info
            if status.ready and state != "open" and tier.cfg.task == "chat":
                usable = True
        for name, why in self.disabled.items():
            tiers[name] = {"ready": False, "error": why}
        return usable, tiers
