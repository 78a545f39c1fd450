"""The ledger's connection to Redis: the pool, the scripts, and whether Redis is there.

``connected`` or ``unavailable``. A failed call marks it unavailable
(``LedgerConnection.down``) and a background task reconnects with jittered backoff;
once Redis answers again the connection is marked connected first (new usage goes live,
so the journal only shrinks) and then ``on_connected`` runs (the journal's replay).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Literal

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tracking.batch import BatchConnection
from tracking.config import RedisConfig

log = structlog.get_logger(__name__)

LedgerState = Literal["connected", "unavailable"]

# Errors that mean "Redis cannot be reached": the ledger goes unavailable and reconnects.
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
# Any failure of a Redis call.
REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)


def load_script(name: str) -> str:
    return resources.files("tracking").joinpath("lua", name).read_text(encoding="utf-8")


class Scripts:
    """The Lua scripts, registered on one client (``commit_batch`` runs on the batch
    connection instead)."""

    def __init__(self, redis: Redis) -> None:
        self.admit: AsyncScript = redis.register_script(load_script("admit.lua"))
        self.commit: AsyncScript = redis.register_script(load_script("commit.lua"))
        self.release: AsyncScript = redis.register_script(load_script("release.lua"))


class LedgerConnection:
    def __init__(self, config: RedisConfig, on_connected: Callable[[], Awaitable[None]]) -> None:
        self.config = config
        self._on_connected = on_connected
        self.state: LedgerState = "unavailable"
        self.redis: Redis | None = None
        self.scripts: Scripts | None = None
        self.batches: BatchConnection | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    async def start(self) -> None:
        """Connect and run ``on_connected``. Never raises for a Redis that is down."""
        config = self.config
        # A blocking pool: past max_connections a call waits its turn (up to
        # pool_timeout_s) instead of failing at once.
        pool = BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.max_connections,
            timeout=config.pool_timeout_s,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            # No client-side retries: a retried script could hold twice, and a dead
            # Redis must fail fast. The reconnect loop does the waiting.
            retry=Retry(NoBackoff(), 0),
        )
        self.redis = Redis.from_pool(pool)
        self.scripts = Scripts(self.redis)
        self.batches = BatchConnection(
            pool,
            load_script("commit_batch.lua"),
            timeout_s=config.connect_timeout_s + config.socket_timeout_s,
        )
        try:
            await self.redis.ping()
        except REDIS_FAILED as exc:
            self.lost(exc)
            return
        self._set_connected()
        try:
            await self._on_connected()
        except REDIS_FAILED as exc:
            self.lost(exc)

    def down(self, exc: BaseException) -> None:
        """A Redis call failed: unavailable if Redis is unreachable, logged otherwise."""
        if isinstance(exc, REDIS_DOWN):
            self.lost(exc)
        else:
            log.error("ledger_redis_error", error=f"{type(exc).__name__}: {exc}")

    def lost(self, exc: BaseException) -> None:
        """Redis failed: go unavailable and reconnect in the background (once)."""
        if self.state == "connected" or self._reconnect_task is None:
            log.warning(
                "ledger_unavailable",
                url=self.safe_url(),
                error=f"{type(exc).__name__}: {exc}",
                on_unavailable=self.config.on_unavailable,
            )
        self.state = "unavailable"
        if not self._closed and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = asyncio.create_task(self._reconnect())

    def _set_connected(self) -> None:
        if self.state != "connected":
            log.info("ledger_connected", url=self.safe_url())
        self.state = "connected"

    async def _reconnect(self) -> None:
        assert self.redis is not None
        delay = self.config.reconnect_min_s
        while not self._closed:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.config.reconnect_max_s)
            try:
                await self.redis.ping()
            except REDIS_FAILED as exc:
                log.debug("ledger_reconnect_failed", error=str(exc), retry_in_s=round(delay, 2))
                continue
            # Connected first, so new usage goes live and the journal only shrinks.
            self._set_connected()
            try:
                await self._on_connected()
            except REDIS_FAILED as exc:
                self.state = "unavailable"
                log.warning("journal_replay_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if self.state == "connected":  # no call failed meanwhile
                self._reconnect_task = None
                return

    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        scheme, _, rest = self.config.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    def stop_reconnecting(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        """Stop reconnecting and close the pool and the batch connection."""
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            try:
                await self._reconnect_task
            except asyncio.CancelledError:
                pass
            self._reconnect_task = None
        if self.batches is not None:
            await self.batches.aclose()
        if self.redis is not None:
            await self.redis.aclose()
