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


# -- the plain request, without pydantic -------------------------------------------------
#
# Most requests are a model, a few role/content messages and a handful of numbers. For
# those, ``plain_chat_request`` builds the ``ChatRequest`` that ``CHAT_BODY`` and
# ``chat_request`` would, checked in plain Python and without the intermediate dict:
# pydantic-core is quick in a loop but costs ~16 us of CPU per request inside the running
# daemon (bench/overhead_ab.py), most of the gap to the target. Anything else (a tool, an
# image part, a wrong type, a value out of range, a missing field) returns None and
# ``CHAT_BODY`` decides, and words the error. tests/gateway/test_wire.py checks that the
# two agree.

_PLAIN_ROLES = frozenset(("system", "developer", "user", "assistant"))
_PLAIN_MESSAGE_KEYS = frozenset(("role", "content", "name"))
# Number fields of a plain body: (a float field, may be null, least, most); None for no
# bound. As declared in ChatCompletionBody. Each is the ChatRequest field of its name,
# except max_completion_tokens, which wins over max_tokens.
_PLAIN_NUMBERS: dict[str, tuple[bool, bool, float | None, float | None]] = {
    "max_tokens": (False, True, 1, None),
    "max_completion_tokens": (False, True, 1, None),
    "temperature": (True, True, 0, 2),
    "top_p": (True, True, 0, 1),
    "top_k": (False, True, 0, None),
    "n": (False, False, 1, 128),
    "seed": (False, True, None, None),
    "presence_penalty": (True, True, -2, 2),
    "frequency_penalty": (True, True, -2, 2),
}
# Known fields a plain body may not carry: only CHAT_BODY checks these.
_NOT_PLAIN = frozenset(("tools", "tool_choice", "response_format", "stream_options"))


def plain_chat_request(raw: dict[str, Any], request_id: str) -> ChatRequest | None:
    """``chat_request(CHAT_BODY.validate_python(raw), raw, request_id)`` for a plainly
    valid body, built directly; None for any other body."""
    model = raw.get("model")
    messages = raw.get("messages")
    if type(model) is not str or not model or type(messages) is not list or not messages:
        return None
    for m in messages:
        if (
            type(m) is not dict
            or m.get("role") not in _PLAIN_ROLES
            or type(m.get("content")) is not str
            or not _PLAIN_MESSAGE_KEYS.issuperset(m)
            or type(m.get("name", "")) is not str
        ):
            return None
    req = ChatRequest(model, tuple(messages), raw, request_id=request_id)
    if len(raw) == 2:  # model and messages alone
        return req
    completion_cap = None
    for name, value in raw.items():
        bounds = _PLAIN_NUMBERS.get(name)
        if bounds is not None:
            is_float, nullable, least, most = bounds
            if value is None:
                if not nullable:
                    return None
            else:
                kind = type(value)
                if kind is not int and not (is_float and kind is float):
                    return None
                if (least is not None and value < least) or (most is not None and value > most):
                    return None
                if is_float:
                    value = float(value)
            if name == "max_completion_tokens":
                completion_cap = value
            else:
                setattr(req, name, value)
        elif name == "stream":
            if type(value) is not bool:
                return None
            req.stream = value
        elif name == "stop":
            if value is None:
                pass
            elif type(value) is str:
                req.stop = (value,)
            elif type(value) is list and len(value) <= MAX_STOP_SEQUENCES and all(type(v) is str for v in value):
                req.stop = tuple(value)
            else:
                return None
        elif name == "user":
            if value is not None and type(value) is not str:
                return None
            req.user = value
        elif name in _NOT_PLAIN:
            return None
    if completion_cap is not None:
        req.max_tokens = completion_cap
    return req


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
