"""Engine registry: ``engine = "..."`` in a local tier's TOML picks one.

- ``continuous`` (default): ``BatchedEngine``, continuous batching over a slot cache on
  the transformers weights (a GGUF is converted once to safetensors);
- ``transformers_cb``: transformers' own ``ContinuousBatchingManager`` behind the same
  interface (greedy or one fixed sampling setup per tier; see ``transformers_cb.py``);
- ``llama_cpp``: a GGUF served by llama.cpp in process, continuous batching by sequence
  id (``llama_cpp.py``); needs the ``llamacpp`` extra. With ``fallback_engine`` set, a
  host where it cannot run (not installed; a GPU and a CPU-only build) loads with that
  engine instead and logs ``local_engine_fallback`` once.
"""

from __future__ import annotations

from typing import Any

import structlog

from providers.local.config import LocalTierConfig
from providers.local.engine import BatchedEngine, Engine
from providers.local.resolve import ModelSpecError

log = structlog.get_logger(__name__)

ENGINES = ("continuous", "transformers_cb", "llama_cpp")


def _engine_class(name: str) -> Any:
    if name == "continuous":
        return BatchedEngine
    if name == "transformers_cb":
        from providers.local.transformers_cb import TransformersCBEngine

        return TransformersCBEngine
    raise ModelSpecError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


def make_engine(cfg: LocalTierConfig, loaded: Any, name: str | None = None) -> Engine:
    """A transformers-weights engine over ``loaded`` (the transformers loader's result)."""
    engine: Engine = _engine_class(name or cfg.engine)(
        loaded.model,
        eos_token_ids=loaded.eos_token_ids,
        max_context=loaded.max_context,
        max_batch=cfg.max_batch,
        max_queue=cfg.max_queue,
        name=cfg.name,
    )
    return engine


def chosen_engine(cfg: LocalTierConfig) -> str:
    """The engine this tier will run here: ``cfg.engine``, or its fallback when that
    cannot run on this host (logged)."""
    name = cfg.engine
    if name not in ENGINES:
        raise ModelSpecError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    if name == "llama_cpp" and cfg.fallback_engine:
        from providers.local.llama_model import EngineUnavailable, check_usable

        try:
            check_usable(cfg)
        except EngineUnavailable as exc:
            log.warning("local_engine_fallback", tier=cfg.name, engine=name,
                        fallback=cfg.fallback_engine, reason=str(exc))
            return cfg.fallback_engine
    return name


def load_chat_engine(cfg: LocalTierConfig) -> tuple[Any, Engine]:
    """Load the tier's model and build its engine (blocking: run it on a thread).
    Returns (what was loaded: tokenizer, max_context, ...; the engine, not started)."""
    name = chosen_engine(cfg)
    if name == "llama_cpp":
        from providers.local.llama_cpp import LlamaCppEngine
        from providers.local.llama_model import load_llama_chat

        loaded = load_llama_chat(cfg)
        try:
            engine: Engine = LlamaCppEngine(
                loaded.model, max_context=loaded.max_context, max_batch=cfg.max_batch,
                max_queue=cfg.max_queue, name=cfg.name, context_size=cfg.context_size,
                batch_tokens=cfg.batch_tokens, prefix_cache=cfg.prefix_cache,
                kv_unified=cfg.kv_unified,
            )
            loaded.max_context = engine.max_context
        except BaseException:
            loaded.model.close()
            raise
        return loaded, engine
    from providers.local.loader import load_chat_model

    _engine_class(name)  # an unknown fallback fails before the model loads
    loaded = load_chat_model(cfg)
    return loaded, make_engine(cfg, loaded, name)
