"""What the TOML says about one tier (``[[tiers]]``), validated with pydantic.

The gateway's config composes these; providers are built from them. Secrets are never
inline: ``api_key_env`` names an environment variable, ``api_key_credential`` a file under
systemd's ``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TierKind = Literal["openai", "huggingface", "local"]


class ModelPrice(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)


class TierPrice(ModelPrice):
    # Per upstream-model overrides: price.models."gpt-4o" = { input = 2.5, output = 10 }
    models: dict[str, ModelPrice] = Field(default_factory=dict)

    @property
    def is_free(self) -> bool:
        return (
            self.input == 0
            and self.output == 0
            and all(p.input == 0 and p.output == 0 for p in self.models.values())
        )


class TierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: TierKind
    task: Literal["chat", "embeddings"] = "chat"
    # Remote tiers: the API root (".../v1"). The Hugging Face tier defaults to the
    # Inference Providers router.
    base_url: str | None = None
    # The model as the tier knows it: an upstream model id, or for a local tier a path,
    # a .gguf file, "package:<dist>/<file>" or a Hugging Face id in the local cache.
    model: str
    # Public model names this tier answers; "auto" answers any name.
    models: tuple[str, ...] = ()
    api_key_env: str | None = None
    api_key_credential: str | None = None
    price: TierPrice = Field(default_factory=TierPrice)
    timeout_s: float = Field(60.0, gt=0)
    # The output cap when the client gives none: sent to a priced tier (a budget hold
    # must assume a bound) and applied by a local tier (a generation must end).
    max_output_tokens: int = Field(4096, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(100, ge=1)
    headers: dict[str, str] = Field(default_factory=dict)
    # A remote tier that can continue a final assistant message (vLLM's
    # continue_final_message, say) may be the landing tier of a resumed stream.
    can_resume: bool = False
    enabled: bool = True

    # Local tier only.
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

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_tuple(cls, v: object) -> object:
        if isinstance(v, str):
            return (v,)
        return v

    @model_validator(mode="after")
    def _check(self) -> TierConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"tier {self.name!r}: kind 'openai' needs base_url")
        if self.api_key_env and self.api_key_credential:
            raise ValueError(
                f"tier {self.name!r}: give api_key_env or api_key_credential, not both"
            )
        return self

    @property
    def public_models(self) -> tuple[str, ...]:
        return self.models or (self.model,)

    def answers(self, model: str) -> bool:
        return "auto" in self.public_models or model in self.public_models

    def resolve_api_key(self, environ: os._Environ[str] | dict[str, str] | None = None) -> str | None:
        """The secret this tier authenticates with, or None. Never log the result."""
        env = os.environ if environ is None else environ
        if self.api_key_credential:
            cred_dir = env.get("CREDENTIALS_DIRECTORY")
            if not cred_dir:
                return None
            path = Path(cred_dir) / self.api_key_credential
            try:
                return path.read_text().strip() or None
            except OSError:
                return None
        name = self.api_key_env or ("HF_TOKEN" if self.kind == "huggingface" else None)
        if name is None:
            return None
        return env.get(name) or None

    @property
    def key_source(self) -> str:
        """Where the key comes from, for messages (the name, never the value)."""
        if self.api_key_credential:
            return f"credential {self.api_key_credential}"
        if self.api_key_env:
            return f"${self.api_key_env}"
        return "$HF_TOKEN" if self.kind == "huggingface" else "none"
