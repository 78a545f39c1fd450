"""What the TOML says about one tier (``[[tiers]]``): the part every kind shares.

Each provider kind owns its config model, a subclass of ``TierConfig`` with
``kind: Literal["<kind>"]``, its own fields and its rules (whether it needs a key, where
the key comes from by default, its base URL); ``providers.registry`` puts them in one
pydantic discriminated union on ``kind``. The remote kinds share ``RemoteTierConfig``.

Secrets are never inline: ``api_key_env`` names an environment variable,
``api_key_credential`` a file under systemd's ``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    """The fields of every tier. A kind's model narrows ``kind`` to its own tag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: str
    task: Literal["chat", "embeddings"] = "chat"
    # The model as the tier knows it: an upstream model id, or for a local tier a path,
    # a .gguf file, "package:<dist>/<file>" or a Hugging Face id in the local cache.
    model: str
    # Public model names this tier answers; "auto" answers any name.
    models: tuple[str, ...] = ()
    price: TierPrice = Field(default_factory=TierPrice)
    timeout_s: float = Field(60.0, gt=0)
    # The output cap when the client gives none: sent to a priced tier (a budget hold
    # must assume a bound) and applied by a local tier (a generation must end).
    max_output_tokens: int = Field(4096, ge=1)
    enabled: bool = True

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_tuple(cls, v: object) -> object:
        if isinstance(v, str):
            return (v,)
        return v

    @property
    def public_models(self) -> tuple[str, ...]:
        return self.models or (self.model,)

    def answers(self, model: str) -> bool:
        return "auto" in self.public_models or model in self.public_models

    # -- rules a kind may change ------------------------------------------------------

    @property
    def needs_key(self) -> bool:
        """The tier does not serve without a key (it is left out when none is found)."""
        return False

    def resolve_api_key(self, environ: Mapping[str, str]) -> str | None:
        """The secret this tier authenticates with, or None. Never log the result."""
        return None

    @property
    def key_source(self) -> str:
        """Where the key comes from, for messages (the name, never the value)."""
        return "none"

    @property
    def location(self) -> str:
        """Where the tier's model is served from, for ``tiergate check``."""
        return self.model


class RemoteTierConfig(TierConfig):
    """A tier behind an HTTP API: its root, its key, its connection pool."""

    # The key variable read when the tier names none (Hugging Face: HF_TOKEN), and
    # whether the tier refuses to serve without a key even when it names no source.
    default_key_env: ClassVar[str | None] = None
    key_required: ClassVar[bool] = False

    # The API root (".../v1").
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_credential: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(100, ge=1)
    headers: dict[str, str] = Field(default_factory=dict)
    # An upstream that can continue a final assistant message (vLLM's
    # continue_final_message, say) may be the landing tier of a resumed stream.
    can_resume: bool = False

    @model_validator(mode="after")
    def _one_key_source(self) -> RemoteTierConfig:
        if self.api_key_env and self.api_key_credential:
            raise ValueError(
                f"tier {self.name!r}: give api_key_env or api_key_credential, not both"
            )
        return self

    @property
    def needs_key(self) -> bool:
        return self.key_required or bool(self.api_key_env or self.api_key_credential)

    def resolve_api_key(self, environ: Mapping[str, str]) -> str | None:
        if self.api_key_credential:
            cred_dir = environ.get("CREDENTIALS_DIRECTORY")
            if not cred_dir:
                return None
            path = Path(cred_dir) / self.api_key_credential
            try:
                return path.read_text().strip() or None
            except OSError:
                return None
        name = self.api_key_env or self.default_key_env
        if name is None:
            return None
        return environ.get(name) or None

    @property
    def key_source(self) -> str:
        if self.api_key_credential:
            return f"credential {self.api_key_credential}"
        name = self.api_key_env or self.default_key_env
        return f"${name}" if name else "none"

    @property
    def location(self) -> str:
        return self.base_url or ""
