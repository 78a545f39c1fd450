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
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, Field, TypeAdapter
from typing_extensions import Required, TypedDict

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


# Fast path: docs/BENCHMARKS.md "request bodies as TypedDicts".
# Request bodies are TypedDicts validated by a TypeAdapter: pydantic checks every known
# field's type and range and returns a plain dict of the known fields, without building a
# model instance per request and per message (several times cheaper on the hot path).
# Unknown fields are ignored here; the raw body keeps them for the tiers.


def _message_complete(m: Message) -> Message:
    role = m["role"]
    if m.get("content") is None and role != "assistant":
        raise ValueError(f"a {role} message needs content")
    if role == "tool" and not m.get("tool_call_id"):
        raise ValueError("a tool message needs tool_call_id")
    return m


MAX_STOP_SEQUENCES = 16


def _check_stop(v: str | list[str]) -> str | list[str]:
    if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    return v


def _check_tools(v: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, tool in enumerate(v):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    return v


class Message(TypedDict, total=False):
    role: Required[Literal["system", "developer", "user", "assistant", "tool", "function"]]
    content: str | list[dict[str, Any]] | None
    name: str | None
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None


class StreamOptions(TypedDict, total=False):
    include_usage: bool


class ChatCompletionBody(TypedDict, total=False):
    model: Required[Annotated[str, Field(min_length=1)]]
    messages: Required[Annotated[list[Annotated[Message, AfterValidator(_message_complete)]], Field(min_length=1)]]
    stream: bool
    stream_options: StreamOptions | None
    max_tokens: Annotated[int, Field(ge=1)] | None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None
    temperature: Annotated[float, Field(ge=0, le=2)] | None
    top_p: Annotated[float, Field(ge=0, le=1)] | None
    top_k: Annotated[int, Field(ge=0)] | None
    n: Annotated[int, Field(ge=1, le=128)]
    stop: Annotated[str | list[str], AfterValidator(_check_stop)] | None
    seed: int | None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None
    tools: Annotated[list[dict[str, Any]], AfterValidator(_check_tools)] | None
    tool_choice: str | dict[str, Any] | None
    response_format: dict[str, Any] | None
    user: str | None


def _check_inputs(v: str | list[str]) -> str | list[str]:
    if isinstance(v, list) and not v:
        raise ValueError("input must not be empty")
    if isinstance(v, list) and len(v) > 2048:
        raise ValueError("at most 2048 inputs per request")
    return v


class EmbeddingBody(TypedDict, total=False):
    model: Required[Annotated[str, Field(min_length=1)]]
    input: Required[Annotated[str | list[str], AfterValidator(_check_inputs)]]
    encoding_format: Literal["float", "base64"]
    dimensions: Annotated[int, Field(ge=1)] | None
    user: str | None


CHAT_BODY: TypeAdapter[ChatCompletionBody] = TypeAdapter(ChatCompletionBody)
EMBEDDING_BODY: TypeAdapter[EmbeddingBody] = TypeAdapter(EmbeddingBody)


def chat_request(body: ChatCompletionBody, raw: dict[str, Any], request_id: str) -> ChatRequest:
    """The ``ChatRequest`` for a validated body; ``raw`` (the client's JSON, unknown fields
    included) is kept for the tiers."""
    get = body.get
    stop = get("stop")
    options = get("stream_options")
    tools = get("tools")
    return ChatRequest(
        model=body["model"],
        messages=tuple(raw["messages"]),
        body=raw,
        stream=get("stream", False),
        include_usage=bool(options and options.get("include_usage")),
        max_tokens=get("max_completion_tokens") or get("max_tokens"),
        temperature=get("temperature"),
        top_p=get("top_p"),
        top_k=get("top_k"),
        n=get("n", 1),
        stop=(stop,) if isinstance(stop, str) else tuple(stop) if stop else (),
        seed=get("seed"),
        presence_penalty=get("presence_penalty"),
        frequency_penalty=get("frequency_penalty"),
        tools=tuple(tools) if tools else None,
        tool_choice=get("tool_choice"),
        response_format=get("response_format"),
        user=get("user"),
        request_id=request_id,
    )


def embedding_request(body: EmbeddingBody, raw: dict[str, Any], request_id: str) -> EmbeddingRequest:
    inputs = body["input"]
    return EmbeddingRequest(
        model=body["model"],
        inputs=(inputs,) if isinstance(inputs, str) else tuple(inputs),
        encoding_format=body.get("encoding_format", "float"),
        dimensions=body.get("dimensions"),
        user=body.get("user"),
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
