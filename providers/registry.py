"""The provider kinds: one line each, the config model and what builds the provider.

A new kind is one module (its provider and its config model, a ``TierConfig`` subclass
with ``kind: Literal["<kind>"]``) plus one line in ``KINDS``. The TOML's ``[[tiers]]``
are validated as a pydantic discriminated union on ``kind`` over every kind listed here.

The local tier's module is light (``providers.local`` imports torch only when a model
loads), so a daemon with only remote tiers starts without torch installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from providers.base import Provider
from providers.config import TierConfig
from providers.huggingface import HuggingFaceProvider, HuggingFaceTierConfig
from providers.local import build_local_provider
from providers.local.config import LocalTierConfig
from providers.openai_compat import OpenAICompatProvider, OpenAITierConfig


class MissingKey(Exception):
    """A tier that needs a key found none in its key source: the tier is left out."""


@dataclass(frozen=True, slots=True)
class ProviderKind:
    """A kind of tier: its config model, and ``build(config, api_key)`` for its provider."""

    config: type[TierConfig]
    build: Callable[[Any, str | None], Provider]


KINDS: dict[str, ProviderKind] = {
    "openai": ProviderKind(OpenAITierConfig, OpenAICompatProvider),
    "huggingface": ProviderKind(HuggingFaceTierConfig, HuggingFaceProvider),
    "local": ProviderKind(LocalTierConfig, build_local_provider),
}


def tier_configs() -> TypeAdapter[tuple[TierConfig, ...]]:
    """A validator for ``[[tiers]]``: the discriminated union of every kind in ``KINDS``
    (built when asked, so a kind added to ``KINDS`` is taken at once)."""
    models = tuple(kind.config for kind in KINDS.values())
    one: Any = Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007
    return TypeAdapter(tuple[one, ...])


def tier_config(**fields: Any) -> TierConfig:
    """One tier's config from its fields, as ``[[tiers]]`` would give them."""
    return tier_configs().validate_python((fields,))[0]


def build_provider(cfg: TierConfig, environ: Mapping[str, str]) -> Provider:
    """The provider for ``cfg``; ``MissingKey`` when it needs a key and has none."""
    key = cfg.resolve_api_key(environ)
    if key is None and cfg.needs_key:
        raise MissingKey(f"tier {cfg.name!r}: no API key in {cfg.key_source}")
    return KINDS[cfg.kind].build(cfg, key)
