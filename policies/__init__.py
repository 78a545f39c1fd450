"""Routing policies: order the tiers for each request."""

from policies.base import Policy, TierView
from policies.file_order import FileOrder

__all__ = ["FileOrder", "Policy", "TierView"]
