"""The OpenAI wire format at the edge: pydantic models for request bodies, and the JSON
shapes of responses and stream chunks.

Request models allow unknown fields (they are passed through to OpenAI-compatible
tiers); known fields are checked for type and range so a bad request gets a clear 400
naming the parameter.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Sequence
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from providers.schemas import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    Usage,
)

dumps = orjson.dumps  # compact UTF-8 JSON, as bytes
loads = orjson.loads


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(v or ()):
            fn = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
                raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        return v

    def to_request(self, raw: dict[str, Any], request_id: str) -> ChatRequest:
        stop: tuple[str, ...] = ()
        if isinstance(self.stop, str):
            stop = (self.stop,)
        elif self.stop:
            stop = tuple(self.stop)
        return ChatRequest(
            model=self.model,
            messages=tuple(raw["messages"]),
            body=raw,
            stream=self.stream,
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            n=self.n,
            stop=stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            tools=tuple(self.tools) if self.tools else None,
            tool_choice=self.tool_choice,
            response_format=self.response_format,
            user=self.user,
            request_id=request_id,
        )


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] = Field()
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        if isinstance(v, list) and len(v) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return v

    def to_request(self, raw: dict[str, Any], request_id: str) -> EmbeddingRequest:
        inputs = (self.input,) if isinstance(self.input, str) else tuple(self.input)
        return EmbeddingRequest(
            model=self.model,
            inputs=inputs,
            encoding_format=self.encoding_format,
            dimensions=self.dimensions,
            user=self.user,
            body=raw,
            request_id=request_id,
        )


# -- responses ------------------------------------------------------------------------


def completion_json(req: ChatRequest, result: ChatResult, completion_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [
            {
                "index": c.index,
                "message": c.message,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ],
        "usage": result.usage.to_dict(),
    }
    if result.system_fingerprint:
        out["system_fingerprint"] = result.system_fingerprint
    return out


class ChunkWriter:
    """Serialises one stream's chunks as SSE ``data:`` events."""

    DONE = b"data: [DONE]\n\n"

    def __init__(self, req: ChatRequest, completion_id: str) -> None:
        self.req = req
        # The parts every chunk shares, serialised once (without the closing brace).
        head = {"id": completion_id, "object": "chat.completion.chunk",
                "created": int(time.time()), "model": req.model}
        self._head = b"data: " + dumps(head)[:-1]
        self._usage_null = b',"usage":null}\n\n' if req.include_usage else b"}\n\n"

    def chunk(self, chunk: ChatChunk) -> bytes:
        choices = [
            {"index": c.index, "delta": c.delta, "logprobs": c.logprobs,
             "finish_reason": c.finish_reason}
            for c in chunk.choices
        ]
        return b"".join((self._head, b',"choices":', dumps(choices), self._usage_null))

    def usage(self, usage: Usage) -> bytes:
        return b"".join((self._head, b',"choices":[],"usage":', dumps(usage.to_dict()), b"}\n\n"))

    @staticmethod
    def error(message: str, *, code: str, type_: str = "server_error") -> bytes:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return b"data: " + dumps(body) + b"\n\n"


def vector_to_base64(vector: Sequence[float]) -> str:
    """OpenAI's ``encoding_format = "base64"``: little-endian float32 bytes, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def vector_from_base64(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def embeddings_json(req: EmbeddingRequest, result: EmbeddingResult) -> dict[str, Any]:
    data = []
    for i, vec in enumerate(result.vectors):
        if req.encoding_format == "base64":
            emb: Any = vector_to_base64(vec)
        else:
            emb = list(vec)
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": result.usage.prompt_tokens,
                  "total_tokens": result.usage.prompt_tokens},
    }
