"""Bounded waiting for tests: every wait ends, with a message naming what never came."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(predicate: Callable[[], object], what: str, timeout_s: float = 15.0) -> None:
    """Poll ``predicate`` until it is true; ``AssertionError`` naming ``what`` after
    ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)
