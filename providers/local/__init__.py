"""The local tier: a model in this process (chat or embeddings).

``build_local_provider(cfg)`` is the one entry point the gateway calls (through
``providers.registry``); ``LocalTierConfig`` (``providers.local.config``) is the tier's
config model. torch and transformers are imported only when a model loads, so a gateway
with no local tier starts without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from providers.local.config import LocalTierConfig

if TYPE_CHECKING:
    from providers.local.chat import LocalChatProvider
    from providers.local.embeddings import LocalEmbeddingProvider

__all__ = ["LocalTierConfig", "build_local_provider"]


def build_local_provider(
    cfg: LocalTierConfig, api_key: str | None = None
) -> LocalChatProvider | LocalEmbeddingProvider:
    """A provider for a ``kind = "local"`` tier; ``cfg.task`` picks chat or embeddings.

    Construction is cheap and never fails on the model; ``await provider.start()``
    begins loading on a thread. ``provider.ready`` turns true once loaded;
    ``provider.status()`` says why when loading failed (the tier then answers every
    request with ``CapacityError``, so the router moves on). A local tier takes no key.
    """
    if cfg.task == "embeddings":
        from providers.local.embeddings import LocalEmbeddingProvider

        return LocalEmbeddingProvider(cfg)
    from providers.local.chat import LocalChatProvider

    return LocalChatProvider(cfg)
