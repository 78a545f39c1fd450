"""The running state of one daemon: config, providers, router, ledger, keys.

Built from a ``Config``, started once, stopped once. Nothing global: the aiohttp app
holds the runtime, handlers read it from there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from gateway.config import Config
from gateway.health import TierHealth
from gateway.accesslog import AccessLog
from gateway.router import Router
from gateway.routing import Tier
from gateway.tasks import BackgroundTasks
from policies import FileOrder, Policy
from providers.base import Provider
from providers.config import TierConfig
from providers.registry import MissingKey, build_provider
from tracking import KeyStore, Ledger, Price, PriceTable

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The daemon must not start with this config (an unsafe bind, say)."""


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


def state_dir(config: Config, environ: Mapping[str, str]) -> Path:
    """systemd's $STATE_DIRECTORY wins over the file's server.state_dir."""
    raw = environ.get("STATE_DIRECTORY", "").split(":")[0] or config.server.state_dir
    return Path(raw)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


POLICIES: dict[str, type] = {"file_order": FileOrder}


class Runtime:
    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.started_at = time.time()
        self.background = BackgroundTasks()
        self.access_log = AccessLog(config.logging.level, config.logging.format)
        self.keys = KeyStore(config.keys)
        self.prices = price_table(config.tiers)
        self.state_dir = state_dir(config, self.environ)
        journal = config.redis.journal or (self.state_dir / "usage-journal.jsonl")
        self.ledger = Ledger(config.redis, config.budgets, self.prices, self.keys, Path(journal))
        self.disabled: dict[str, str] = {}  # tier name -> why it is not serving
        self.providers: dict[str, Provider] = {}
        tiers: list[Tier] = []
        for position, cfg in enumerate(config.tiers):
            if not cfg.enabled:
                self.disabled[cfg.name] = "disabled in config"
                continue
            try:
                provider = build_provider(cfg, self.environ)
            except MissingKey as exc:
                self.disabled[cfg.name] = str(exc)
                continue
            self.providers[cfg.name] = provider
            tiers.append(
                Tier(
                    cfg=cfg,
                    provider=provider,
                    health=TierHealth(
                        failures_to_open=config.routing.circuit_failures,
                        reset_after_s=config.routing.circuit_reset_s,
                    ),
                    position=position,
                )
            )
        self.router = Router(
            tiers=tiers,
            policy=self._policy(),
            routing=config.routing,
            ledger=self.ledger,
            prices=self.prices,
            background=self.background,
        )

    def _policy(self) -> Policy:
        name = self.config.routing.policy
        if name not in POLICIES:
            raise StartupError(f"routing.policy {name!r} is unknown; known: {', '.join(POLICIES)}")
        return POLICIES[name]()

    def check_bind_safety(self) -> None:
        """Without keys, only loopback and the Unix socket may serve, unless the operator
        explicitly allowed unauthenticated access."""
        server = self.config.server
        listen = server.listen
        if listen is None or not self.keys.empty or server.allow_unauthenticated:
            return
        host = listen[0]
        if not is_loopback(host):
            raise StartupError(
                f"refusing to serve {server.http} without API keys: add [[keys]] "
                "or set server.allow_unauthenticated = true"
            )

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for name, why in self.disabled.items():
            log.warning("tier_unavailable", tier=name, reason=why)
        if self.keys.empty:
            log.warning("serving_without_authentication",
                        http=self.config.server.http or None,
                        unix_socket=self.config.server.unix_socket or None)
        await asyncio.gather(*(p.start() for p in self.providers.values()))
        await self.ledger.start()
        log.info(
            "runtime_started",
            tiers=list(self.providers),
            ledger=self.ledger.state,
            keys=len(self.keys),
        )

    async def stop(self, drain_timeout: float) -> None:
        if not await self.background.drain(drain_timeout):
            log.warning("background_work_unfinished", pending=len(self.background))
        for name, p in self.providers.items():
            try:
                await p.aclose()
            except Exception as exc:  # one tier failing to close must not stop the rest
                log.error("tier_close_failed", tier=name, error=repr(exc))
        await self.ledger.aclose()
        self.access_log.flush()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        tiers: dict[str, object] = {}
        usable = False
        for name, tier in self.router.tiers.items():
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
        ledger = "replaying" if self.ledger.replaying else self.ledger.state
        return usable, {"status": "ready" if usable else "not_ready",
                        "ledger": ledger, "tiers": tiers}
