"""The plain chat body, read without pydantic: a fenced fast path.

Fast path: docs/BENCHMARKS.md "plain chat body without pydantic".

Most requests are a model, a few role/content messages and a handful of numbers. For
those, ``plain_chat_request`` builds the ``ChatRequest`` that ``CHAT_BODY`` and
``chat_request`` (``gateway.wire``) would, checked in plain Python: pydantic-core costs
~16 us of CPU per request inside the running daemon (bench/overhead_ab.py). Anything
else (a tool, an image part, a wrong type, a value out of range, a missing field)
returns None and the schema decides, and words the error.
tests/gateway/test_plain_body.py checks that the two agree on every body it makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.wire import MAX_STOP_SEQUENCES
from providers.schemas import ChatRequest

_PLAIN_ROLES = frozenset(("system", "developer", "user", "assistant"))
_PLAIN_MESSAGE_KEYS = frozenset(("role", "content", "name"))


@dataclass(frozen=True, slots=True)
class NumberField:
    """A number field of a plain body, bounded as ``ChatCompletionBody`` declares it."""

    real: bool  # a float field (an int is taken and made a float); else ints only
    nullable: bool
    least: float | None = None
    most: float | None = None

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        kind = type(value)
        if kind is not int and not (self.real and kind is float):
            return False
        return (self.least is None or value >= self.least) and (self.most is None or value <= self.most)


# Each is the ChatRequest field of its name, except max_completion_tokens, which wins
# over max_tokens.
_NUMBERS: dict[str, NumberField] = {
    "max_tokens": NumberField(real=False, nullable=True, least=1),
    "max_completion_tokens": NumberField(real=False, nullable=True, least=1),
    "temperature": NumberField(real=True, nullable=True, least=0, most=2),
    "top_p": NumberField(real=True, nullable=True, least=0, most=1),
    "top_k": NumberField(real=False, nullable=True, least=0),
    "n": NumberField(real=False, nullable=False, least=1, most=128),
    "seed": NumberField(real=False, nullable=True),
    "presence_penalty": NumberField(real=True, nullable=True, least=-2, most=2),
    "frequency_penalty": NumberField(real=True, nullable=True, least=-2, most=2),
}
# Known fields a plain body may not carry: only CHAT_BODY checks these.
NOT_PLAIN = frozenset(("tools", "tool_choice", "response_format", "stream_options"))


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
    if len(raw) == 2:  # model and messages alone: nothing else to read
        return ChatRequest(model=model, messages=tuple(messages), body=raw, request_id=request_id)
    fields: dict[str, Any] = {}
    completion_cap = None
    for name, value in raw.items():
        number = _NUMBERS.get(name)
        if number is not None:
            if not number.accepts(value):
                return None
            if number.real and value is not None:
                value = float(value)
            if name == "max_completion_tokens":
                completion_cap = value
            else:
                fields[name] = value
        elif name == "stream":
            if type(value) is not bool:
                return None
            fields["stream"] = value
        elif name == "stop":
            if type(value) is str:
                fields["stop"] = (value,)
            elif type(value) is list and len(value) <= MAX_STOP_SEQUENCES and all(type(v) is str for v in value):
                fields["stop"] = tuple(value)
            elif value is not None:
                return None
        elif name == "user":
            if value is not None and type(value) is not str:
                return None
            fields["user"] = value
        elif name in NOT_PLAIN:
            return None
    if completion_cap is not None:
        fields["max_tokens"] = completion_cap
    return ChatRequest(model=model, messages=tuple(messages), body=raw, request_id=request_id, **fields)
