"""Engine registry: ``engine = "..."`` in a local tier's TOML picks one.

- ``continuous`` (default): ``BatchedEngine``, continuous batching over a slot cache;
- ``transformers_cb``: transformers' own ``ContinuousBatchingManager`` behind the same
  interface (greedy or one fixed sampling setup per tier; see ``transformers_cb.py``).
"""

from __future__ import annotations

from typing import Any

from providers.local.config import LocalTierConfig
from providers.local.engine import BatchedEngine, Engine
from providers.local.resolve import ModelSpecError

ENGINES = ("continuous", "transformers_cb")


def _engine_class(name: str) -> Any:
    if name == "continuous":
        return BatchedEngine
    if name == "transformers_cb":
        from providers.local.transformers_cb import TransformersCBEngine

        return TransformersCBEngine
    raise ModelSpecError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


def make_engine(cfg: LocalTierConfig, loaded: Any) -> Engine:
    engine: Engine = _engine_class(cfg.engine)(
        loaded.model,
        eos_token_ids=loaded.eos_token_ids,
        max_context=loaded.max_context,
        max_batch=cfg.max_batch,
        max_queue=cfg.max_queue,
        name=cfg.name,
    )
    return engine
