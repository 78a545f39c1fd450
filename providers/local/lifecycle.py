"""The load-in-the-background lifecycle both local tiers share.

``start`` begins loading on a thread and returns at once; ``ready`` turns true when the
model is in memory; ``load_error`` (and ``status()``) says why it never will. A failed
load is logged with the tier and the cause and leaves the daemon serving its other tiers.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from typing import Any

import structlog

from providers.base import ProviderStatus
from providers.config import TierConfig

log = structlog.get_logger(__name__)


def describe_load_error(exc: BaseException) -> str:
    """A one-line cause for a failed load, for logs and /readyz."""
    from providers.local.resolve import ModelSpecError

    if isinstance(exc, ModelSpecError):
        return str(exc)
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in type(exc).__name__:
        return f"out of memory while loading the model: {exc}"
    if isinstance(exc, OSError):
        return f"cannot read the model: {exc}"
    return f"{type(exc).__name__}: {exc}"


class BackgroundLoad(ABC):
    """Subclasses give ``_load_blocking`` (runs on a thread, returns what it loaded) and
    ``_loaded_ok`` (runs on the event loop with that result)."""

    name: str
    cfg: TierConfig

    def __init__(self, cfg: TierConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.load_error: str | None = None
        self._load_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin loading on a thread; return at once (see ``ready``, ``load_error``)."""
        if self._load_task is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def wait_loaded(self) -> bool:
        """Wait for the load started by ``start``; True when ready."""
        if self._load_task is None:
            await self.start()
        assert self._load_task is not None
        await asyncio.shield(self._load_task)
        return self.ready

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True once the model is loaded."""

    def status(self) -> ProviderStatus:
        return ProviderStatus(ready=self.ready, error=self.load_error)

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(self._load_blocking)
        except Exception as exc:  # any failure here must leave the daemon serving
            self.load_error = f"tier {self.name}: {describe_load_error(exc)}"
            log.error("local_model_load_failed", tier=self.name, model=self.cfg.model,
                      error=self.load_error)
            return
        self._loaded_ok(result)
        log.info("local_tier_ready", tier=self.name, seconds=round(time.perf_counter() - started, 2))

    @abstractmethod
    def _load_blocking(self) -> Any:
        """Load the model (on a thread); return what ``_loaded_ok`` keeps."""

    @abstractmethod
    def _loaded_ok(self, result: Any) -> None:
        """Keep what ``_load_blocking`` returned (on the event loop)."""

    async def _finish_loading(self) -> None:
        """Before closing: let a load in flight end (a thread cannot be cancelled)."""
        if self._load_task is not None and not self._load_task.done():
            await asyncio.shield(self._load_task)
