"""Load a chat or embedding model for a local tier (blocking: run it on a thread).

The architecture comes from the model's own config (``AutoModelForCausalLM`` /
``AutoModel``). Half precision that fails on this device (an operator missing, NaNs in
a smoke forward) falls back to float32, and the reason is logged.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from providers.local.config import LocalTierConfig
from providers.local.gguf_cache import converted_gguf
from providers.local.resolve import (
    ModelSpecError,
    default_cache_dir,
    pick_device,
    pick_dtype,
    resolve_model,
)

log = structlog.get_logger(__name__)

# transformers' from_pretrained is not safe to run on two threads of one process at
# once (seen: "Cannot copy out of meta tensor" when the chat and embedding tiers loaded
# together), so local tiers take turns loading. Process-wide because the hazard is.
_LOADING = threading.Lock()


def _one_at_a_time(load: Callable[[LocalTierConfig], LoadedModel]) -> Callable[[LocalTierConfig], LoadedModel]:
    @functools.wraps(load)
    def locked(cfg: LocalTierConfig) -> LoadedModel:
        with _LOADING:
            return load(cfg)

    return locked


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    device: str
    dtype: Any
    path: Path
    max_context: int
    eos_token_ids: frozenset[int] = frozenset()
    gguf_cache_hit: bool | None = None  # None: not a GGUF model
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    max_seq_length: int | None = None  # embeddings: the sentence-transformers limit


def configure_threads() -> None:
    """Use every core we are allowed for intra-op work, one inter-op thread."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)


def _model_dir(cfg: LocalTierConfig) -> tuple[Path, bool | None]:
    resolved = resolve_model(cfg.model, allow_download=cfg.allow_download)
    if not resolved.is_gguf:
        return resolved.path, None
    cache = default_cache_dir(cfg.cache_dir)
    converted = converted_gguf(resolved.path, cache)
    return converted.path, converted.cache_hit


@_one_at_a_time
def load_chat_model(cfg: LocalTierConfig) -> LoadedModel:
    """Resolve, convert (GGUF), and load a causal LM with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    configure_threads()
    device = pick_device(cfg.device)
    path, cache_hit = _model_dir(cfg)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as exc:
        raise ModelSpecError(f"unknown or unsupported architecture in {path}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ModelSpecError(f"the tokenizer in {path} has no chat template")
    dtype = pick_dtype(cfg.dtype, device)

    def load(dt: Any) -> Any:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, attn_implementation="sdpa", device_map=None
        )
        return model.to(device).eval()

    try:
        model = load(dtype)
    except ValueError as exc:
        raise ModelSpecError(f"cannot load the architecture in {path}: {exc}") from exc
    if dtype != torch.float32:
        reason = _half_precision_fault(model, device)
        if reason:
            log.warning(
                "local_half_precision_fallback", tier=cfg.name, dtype=str(dtype), reason=reason
            )
            del model
            dtype = torch.float32
            model = load(dtype)

    if cfg.quantize == "int8":
        if device != "cpu":
            raise ModelSpecError(f"quantize = 'int8' is for the CPU; this tier runs on {device}")
        from providers.local.quantize import quantize_int8

        log.info("local_model_quantized", tier=cfg.name, quantize="int8", linears=quantize_int8(model))
    max_context = _context_length(config)
    if cfg.max_context:
        max_context = min(max_context, cfg.max_context) if max_context else cfg.max_context
    eos = _eos_ids(model, tokenizer)
    gen = model.generation_config
    defaults = {
        "do_sample": bool(getattr(gen, "do_sample", False)),
        "temperature": getattr(gen, "temperature", None),
        "top_p": getattr(gen, "top_p", None),
        "top_k": getattr(gen, "top_k", None),
    }
    log.info(
        "local_model_loaded",
        tier=cfg.name,
        path=str(path),
        architecture=(config.architectures or [config.model_type])[0],
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        max_context=max_context,
        gguf_cache_hit=cache_hit,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        path=path,
        max_context=max_context,
        eos_token_ids=eos,
        gguf_cache_hit=cache_hit,
        generation_defaults=defaults,
    )


@_one_at_a_time
def load_embedding_model(cfg: LocalTierConfig) -> LoadedModel:
    """Load a sentence-embedding encoder (a sentence-transformers directory or plain)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    configure_threads()
    device = pick_device(cfg.device)
    resolved = resolve_model(cfg.model, allow_download=cfg.allow_download)
    if resolved.is_gguf:
        raise ModelSpecError("an embedding tier needs a model directory, not a .gguf file")
    path = resolved.path
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as exc:
        raise ModelSpecError(f"unknown or unsupported architecture in {path}: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = pick_dtype(cfg.dtype, device)
    # Embedding encoders are small and compute-bound: float32 on CPU keeps vectors exact.
    if device == "cpu" and cfg.dtype == "auto":
        import torch

        dtype = torch.float32
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    max_seq = None
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        try:
            max_seq = int(json.loads(st_config.read_text()).get("max_seq_length") or 0) or None
        except (ValueError, OSError) as exc:
            log.warning("sentence_config_unreadable", tier=cfg.name, error=str(exc))
    limit = _context_length(config) or 512
    if max_seq:
        limit = min(limit, max_seq)
    if cfg.max_context:
        limit = min(limit, cfg.max_context)
    log.info("local_embedding_model_loaded", tier=cfg.name, path=str(path), device=device)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        path=path,
        max_context=limit,
        max_seq_length=max_seq,
    )


def _context_length(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(ids)


def _half_precision_fault(model: Any, device: str) -> str | None:
    """Why half precision does not work here, or None when a smoke forward is sane."""
    import torch

    try:
        with torch.inference_mode():
            ids = torch.tensor([[1, 2, 3, 4]], device=device)
            logits = model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            return "non-finite logits in a smoke forward"
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
