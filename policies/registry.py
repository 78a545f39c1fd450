"""The policies by name, and a user's own by ``"package.module:Class"``.

``[routing] policy`` names one. A shipped policy is one module plus one line in
``POLICIES``; a user's own needs no line at all: its import path is its name.
"""

from __future__ import annotations

import importlib
from typing import Any

from policies.base import Policy
from policies.file_order import FileOrder

POLICIES: dict[str, type[Any]] = {
    "file_order": FileOrder,
}


class PolicyError(ValueError):
    """The name does not lead to a usable policy; the message says why."""


def policy_class(spec: str) -> type[Any]:
    """The class ``spec`` names: a key of ``POLICIES`` or ``"package.module:Class"``."""
    if ":" not in spec:
        try:
            return POLICIES[spec]
        except KeyError:
            known = ", ".join(sorted(POLICIES))
            raise PolicyError(
                f"unknown policy {spec!r}; known: {known}, or \"package.module:Class\""
            ) from None
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PolicyError(f"cannot import {module_name!r} for policy {spec!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise PolicyError(f"{module_name!r} has no class {attr!r}")
    if not callable(getattr(cls, "rank", None)):
        raise PolicyError(f"{spec!r} is not a policy: it has no rank(request, tiers)")
    return cls


def load_policy(spec: str) -> Policy:
    """A new instance of the policy ``spec`` names (see ``policy_class``)."""
    cls = policy_class(spec)
    try:
        policy = cls()
    except Exception as exc:  # a user's class: any failure is a config error
        raise PolicyError(f"policy {spec!r} failed to start: {type(exc).__name__}: {exc}") from exc
    return policy  # type: ignore[no-any-return]
