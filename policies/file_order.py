"""Try tiers in the order the TOML file lists them: the default until an operator picks another."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import TierView
from providers.schemas import ChatRequest


class FileOrder:
    name = "file_order"
    static_order = True

    def rank(self, request: ChatRequest, tiers: Sequence[TierView]) -> list[str]:
        return [t.name for t in sorted(tiers, key=lambda t: t.position)]
