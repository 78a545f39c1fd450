"""The running state of one daemon process, and its current generation.

Two lifetimes. The ``Runtime`` holds what lives as long as the process: the ledger (its
Redis connection and journal), the providers (``ProviderPool``, one per tier config),
the background tasks, the access log. A ``Generation`` (``gateway.generation``) is what
one config builds; the runtime points at the current one, and ``swap`` replaces it in
one step. Nothing global: the server holds the runtime, handlers read the generation
from the request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from gateway.accesslog import AccessLog
from gateway.config import Config
from gateway.generation import Generation, price_table
from gateway.tasks import BackgroundTasks
from providers.base import Provider
from providers.config import TierConfig
from providers.registry import build_provider
from tracking import KeyStore, Ledger

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The daemon must not start with this config (an unsafe bind, say)."""


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


class ProviderPool:
    """The process's providers, one per tier config (and key): a generation built from
    an edited file gets the same provider for every tier the edit left alone, so an
    unchanged local model is never loaded twice."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._providers: dict[tuple[str, str, str | None], Provider] = {}

    def provider_for(self, cfg: TierConfig) -> Provider:
        """The provider for ``cfg``, made on first use; ``MissingKey`` as
        ``providers.registry.build_provider`` raises it."""
        key = (cfg.kind, cfg.model_dump_json(), cfg.resolve_api_key(self._environ))
        provider = self._providers.get(key)
        if provider is None:
            provider = self._providers[key] = build_provider(cfg, self._environ)
        return provider

    async def aclose(self) -> None:
        for provider in list(self._providers.values()):
            try:
                await provider.aclose()
            except Exception as exc:  # one tier failing to close must not stop the rest
                log.error("tier_close_failed", tier=provider.name, error=repr(exc))
        self._providers.clear()


class Runtime:
    def __init__(self, config: Config, *, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.started_at = time.time()
        self.background = BackgroundTasks()
        self.access_log = AccessLog(config.logging.level, config.logging.format)
        self.state_dir = state_dir(config, self.environ)
        journal = config.redis.journal or (self.state_dir / "usage-journal.jsonl")
        self.ledger = Ledger(config.redis, config.budgets, price_table(config.tiers),
                             KeyStore(config.keys), Path(journal))
        self.providers = ProviderPool(self.environ)
        self.generation = self.build(config)

    # -- generations ------------------------------------------------------------------

    def build(self, config: Config) -> Generation:
        """A generation for ``config``, with this process's providers and ledger. Its new
        providers are not started: ``install`` starts them before the swap."""
        return Generation(config, provider_for=self.providers.provider_for, ledger=self.ledger,
                          background=self.background)

    def swap(self, generation: Generation) -> Generation:
        """Make ``generation`` the one new requests get, in one step, and give the ledger
        its keys, prices and budgets. Returns the generation it replaces: requests in
        flight finish on it."""
        old, self.generation = self.generation, generation
        self.ledger.reconfigure(budgets=generation.config.budgets, prices=generation.prices,
                                keys=generation.keys)
        return old

    async def install(self, config: Config) -> Generation:
        """Build a generation for ``config``, start its providers (those it shares with
        the current one are started already), then swap it in. Returns the old one."""
        generation = self.build(config)
        await asyncio.gather(*(p.start() for p in generation.providers.values()))
        return self.swap(generation)

    # -- the process ------------------------------------------------------------------

    def check_bind_safety(self) -> None:
        """Without keys, only loopback and the Unix socket may serve, unless the operator
        explicitly allowed unauthenticated access."""
        generation = self.generation
        server = generation.config.server
        listen = server.listen
        if listen is None or not generation.keys.empty or server.allow_unauthenticated:
            return
        host = listen[0]
        if not is_loopback(host):
            raise StartupError(
                f"refusing to serve {server.http} without API keys: add [[keys]] "
                "or set server.allow_unauthenticated = true"
            )

    async def start(self) -> None:
        generation = self.generation
        server = generation.config.server
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for name, why in generation.disabled.items():
            log.warning("tier_unavailable", tier=name, reason=why)
        if generation.keys.empty:
            log.warning("serving_without_authentication", http=server.http or None,
                        unix_socket=server.unix_socket or None)
        await asyncio.gather(*(p.start() for p in generation.providers.values()))
        await self.ledger.start()
        log.info("runtime_started", tiers=list(generation.tiers), ledger=self.ledger.state,
                 keys=len(generation.keys))

    async def stop(self, drain_timeout: float) -> None:
        if not await self.background.drain(drain_timeout):
            log.warning("background_work_unfinished", pending=len(self.background))
        await self.providers.aclose()
        await self.ledger.aclose()
        self.access_log.flush()

    def readiness(self, generation: Generation) -> tuple[bool, dict[str, object]]:
        """/readyz: ``generation``'s tiers, and the ledger's state."""
        usable, tiers = generation.readiness()
        ledger = "replaying" if self.ledger.replaying else self.ledger.state
        return usable, {"status": "ready" if usable else "not_ready", "ledger": ledger, "tiers": tiers}
