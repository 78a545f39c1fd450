"""The plain-body fast path agrees with the pydantic schema on every body."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from gateway.plain_body import NOT_PLAIN, plain_chat_request
from gateway.wire import CHAT_BODY, chat_request

BASE = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}

# Per field: values the schema takes and values it refuses or that a plain body must not
# carry, to mix into bodies. A missing field is the value ABSENT.
ABSENT = object()
VARIANTS: dict[str, list[object]] = {
    "model": ["m", "", 3, None, ABSENT],
    "messages": [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "ann"}],
        [{"role": "assistant", "content": ""}],
        [{"role": "developer", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
        [],
        "hello",
        [{"role": "user"}],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": None}],
        [{"role": "assistant", "content": None}],
        [{"role": "tool", "content": "42"}],
        [{"role": "tool", "content": "42", "tool_call_id": "c1"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "user", "content": "hi", "name": None}],
        [{"role": "user", "content": "hi", "name": 5}],
        [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}],
        ["not a message"],
        ABSENT,
    ],
    "stream": [True, False, 1, "yes", None, ABSENT],
    "max_tokens": [1, 64, 0, -3, 1.0, 1.5, "10", True, None, ABSENT],
    "max_completion_tokens": [5, 0, 2.0, None, ABSENT],
    "temperature": [0, 1, 0.7, 2, 2.5, -0.1, "0.5", True, None, ABSENT],
    "top_p": [0, 0.9, 1, 1.01, None, ABSENT],
    "top_k": [0, 40, -1, 1.5, None, ABSENT],
    "n": [1, 3, 128, 0, 129, True, 2.0, None, ABSENT],
    "stop": ["\n", ["a", "b"], [], ["x"] * 17, [1], 5, None, ABSENT],
    "seed": [7, -1, 2**70, 1.0, "7", None, ABSENT],
    "presence_penalty": [0, -2, 2, 2.1, None, ABSENT],
    "frequency_penalty": [0.5, -2.5, None, ABSENT],
    "user": ["u1", 5, None, ABSENT],
    "tools": [[{"type": "function", "function": {"name": "f"}}], [{"type": "x"}], None, ABSENT],
    "tool_choice": ["auto", {"type": "function", "function": {"name": "f"}}, None, ABSENT],
    "response_format": [{"type": "json_object"}, None, ABSENT],
    "stream_options": [{"include_usage": True}, None, ABSENT],
    "extra_field": [{"anything": 1}, ABSENT],
}


def body_with(**fields: object) -> dict:
    body = dict(BASE)
    for name, value in fields.items():
        if value is ABSENT:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def schema_view(raw: dict):
    """What the pydantic path makes of ``raw``: its ChatRequest, or None when refused."""
    try:
        return chat_request(CHAT_BODY.validate_python(raw), raw, "rid")
    except ValidationError:
        return None


def assert_agree(raw: dict) -> bool:
    """Either the fast path declines, or it gives exactly the schema's request."""
    got = plain_chat_request(raw, "rid")
    if got is None:
        return False
    expected = schema_view(raw)
    assert expected is not None, f"fast path took a body the schema refuses: {raw!r}"
    assert got == expected, raw
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        assert type(getattr(got, name)) is type(getattr(expected, name)), name
    return True


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in VARIANTS.items() for v in vs])
def test_each_field_variant_agrees_with_the_schema(field, value):
    assert_agree(body_with(**{field: value}))


def test_random_mixes_agree_with_the_schema():
    rng = random.Random(20261122)
    taken = 0
    for _ in range(3000):
        fields = {f: rng.choice(vs) for f, vs in VARIANTS.items() if rng.random() < 0.4}
        taken += assert_agree(body_with(**fields))
    assert taken > 30  # the fast path did take its share of them


@pytest.mark.parametrize("raw", [
    BASE,
    # what the official openai client sends for a plain chat call
    {"model": "gpt-test", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
     "temperature": 0.2, "max_tokens": 50, "stream": False},
    {**BASE, "stream": True, "n": 2, "stop": ["\n\n"], "seed": 1, "user": "x", "top_p": 1},
])
def test_usual_bodies_take_the_fast_path(raw):
    assert assert_agree(raw)


@pytest.mark.parametrize("field", sorted(NOT_PLAIN))
def test_bodies_only_the_schema_checks_are_left_to_it(field):
    raw = body_with(**{field: VARIANTS[field][0]})
    assert plain_chat_request(raw, "rid") is None
    assert schema_view(raw) is not None
