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
    # --- engine "llama_cpp" and CPU quantization (issue 13) ------------------------
    # When `engine` is not installed here, load with this one instead (logged once);
    # None: the tier fails to load and says why.
    fallback_engine: str | None = None
    threads: int | None = Field(None, ge=1)  # llama.cpp threads; default: the cores we may use
    # llama.cpp: KV cells shared by all sequences; default: the model's training context.
    context_size: int | None = Field(None, ge=64)
    batch_tokens: int = Field(512, ge=32)  # tokens per llama_decode; longer prompts are chunked
    gpu_layers: int | None = None  # layers offloaded (-1: all); default all on a GPU build
    tensor_split: tuple[float, ...] = ()  # share of the model per GPU (llama.cpp's --tensor-split)
    prefix_cache: bool = True  # share the KV cells of a prompt prefix already computed
    # llama.cpp: a stream of context_size / max_batch cells per sequence (llama-server's
    # layout for --parallel; greedy output does not depend on the batch), or one pool
    # for all (a sequence may use all of it; results vary in the last bits with the batch).
    kv_unified: bool = False
    quantize: Literal["none", "int8"] = "none"  # transformers engine on CPU: int8 weights
    # --- end of the llama_cpp block ---------------------------------------------------
