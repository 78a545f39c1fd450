"""Build a provider from its tier config: one line per tier kind.

The local tier is imported lazily, so a daemon with only remote tiers starts without
torch installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from providers.base import Provider
from providers.config import TierConfig


class MissingKey(Exception):
    """A remote tier names a key source that holds no key: the tier is left out."""


def _openai(cfg: TierConfig, key: str | None) -> Provider:
    from providers.openai_compat import OpenAICompatProvider

    return OpenAICompatProvider(cfg, key)


def _huggingface(cfg: TierConfig, key: str | None) -> Provider:
    from providers.huggingface import HuggingFaceProvider

    return HuggingFaceProvider(cfg, key)


def _local(cfg: TierConfig, key: str | None) -> Provider:
    from providers.local import build_local_provider

    return build_local_provider(cfg)


FACTORIES: dict[str, Callable[[TierConfig, str | None], Provider]] = {
    "openai": _openai,
    "huggingface": _huggingface,
    "local": _local,
}


def needs_key(cfg: TierConfig) -> bool:
    """A tier that names a key source (or Hugging Face, which always needs one)."""
    return cfg.kind == "huggingface" or bool(cfg.api_key_env or cfg.api_key_credential)


def build_provider(cfg: TierConfig, environ: Mapping[str, str] | None = None) -> Provider:
    """The provider for ``cfg``; ``MissingKey`` when its key source is empty."""
    env = os.environ if environ is None else environ
    key = cfg.resolve_api_key(dict(env))
    if key is None and needs_key(cfg):
        raise MissingKey(f"tier {cfg.name!r}: no API key in {cfg.key_source}")
    return FACTORIES[cfg.kind](cfg, key)
