"""Routing policies: order the tiers for each request."""

from policies.base import Policy, TierView
from policies.file_order import FileOrder
from policies.registry import POLICIES, PolicyError, load_policy, policy_class

__all__ = ["POLICIES", "FileOrder", "Policy", "PolicyError", "TierView", "load_policy", "policy_class"]
