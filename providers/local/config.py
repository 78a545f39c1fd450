"""``kind = "local"``: what the TOML says about an in-process tier.

Imports neither torch nor transformers, so a config can be checked without them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from providers.config import TierConfig


class LocalTierConfig(TierConfig):
    """A model in this process; ``task`` picks chat or embeddings."""

    kind: Literal["local"] = "local"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    allow_download: bool = False
    cache_dir: str | None = None  # where converted GGUF weights are kept
    max_batch: int = Field(16, ge=1)  # concurrent sequences decoded together
    max_queue: int = Field(64, ge=0)  # waiting beyond the batch; full -> CapacityError
    max_context: int | None = Field(None, ge=16)
    engine: str = "continuous"
