"""Shared request and response types: what passes between the gateway and a provider.

Fast path: docs/BENCHMARKS.md "request and usage types not frozen".
Plain slotted dataclasses, treated as values: never changed once built (``replace``
makes a changed copy). They are not ``frozen=True``: that sets each field through
``object.__setattr__``, and these are built for every request and every stream chunk
(unfreezing them took 2% off the daemon's instructions per request). Pydantic validates
the wire at the gateway's edge and builds these. ``ChatRequest.body`` keeps the client's
whole validated body, unknown fields included, so OpenAI-compatible tiers can pass
through what the gateway does not know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass(slots=True)
class ChatRequest:
    """One chat completion request, as validated at the edge. Treat it as immutable.

    ``max_tokens`` is the effective output cap (``max_completion_tokens`` folded in).
    ``assistant_prefix``, when set, asks the tier to continue a final assistant message
    that already holds this text (streaming failover in ``resume`` mode).
    """

    model: str
    messages: tuple[Mapping[str, Any], ...]
    body: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: tuple[Mapping[str, Any], ...] | None = None
    tool_choice: Any = None
    response_format: Mapping[str, Any] | None = None
    user: str | None = None
    request_id: str = ""
    assistant_prefix: str | None = None

    def replace(self, **changes: Any) -> ChatRequest:
        return dataclasses.replace(self, **changes)


@dataclass(slots=True)
class ChatChoice:
    index: int
    message: Mapping[str, Any]  # {"role": "assistant", "content": ..., "tool_calls": [...]}
    finish_reason: str | None
    logprobs: Any = None


@dataclass(slots=True)
class ChatResult:
    choices: tuple[ChatChoice, ...]
    usage: Usage
    model: str = ""  # the model that answered, as the tier names it
    system_fingerprint: str | None = None


@dataclass(slots=True)
class ChunkChoice:
    index: int
    delta: Mapping[str, Any]  # {"role"?, "content"?, "tool_calls"?}
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass(slots=True)
class ChatChunk:
    """One streamed piece. A chunk with no choices and a usage is the final usage chunk."""

    choices: tuple[ChunkChoice, ...] = ()
    usage: Usage | None = None
    model: str = ""


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    body: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""


@dataclass(slots=True)
class EmbeddingResult:
    vectors: Sequence[Sequence[float]]
    usage: Usage
    model: str = ""


@dataclass(slots=True)
class Health:
    ok: bool
    detail: str = ""
    latency_s: float | None = None
