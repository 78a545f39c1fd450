"""Tool calls in model output, as the common chat templates teach models to write them.

- Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number,
  possibly after some text;
- Llama 3 JSON: the whole answer is ``{"name": ..., "parameters": {...}}`` (optionally
  after ``<|python_tag|>``), several separated by ``;``, or a JSON list of them;
- Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``.

``parse_tool_calls`` reads a whole answer; ``ToolCallStream`` does the same on deltas,
passing plain text through as soon as it cannot be part of a call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_JSON_LEADS = ("<|python_tag|>", "[TOOL_CALLS]")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """An OpenAI ``tool_calls`` entry; ``arguments`` becomes a JSON string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_from_obj(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return tool_call(name, args)


def _json_calls(text: str) -> list[dict[str, Any]] | None:
    """Calls from a JSON-style answer (Llama 3 / Mistral), or None if it is not one."""
    body = text.strip()
    for lead in _JSON_LEADS:
        if body.startswith(lead):
            body = body[len(lead) :].strip()
    if not body or body[0] not in "{[":
        return None
    try:
        parsed = json.loads(body)
        objs = parsed if isinstance(parsed, list) else [parsed]
    except ValueError:
        objs = []
        for part in body.split(";"):
            try:
                objs.append(json.loads(part))
            except ValueError:
                return None
    calls = [_call_from_obj(o) for o in objs]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split an answer into (content, tool calls). No calls: (text, [])."""
    if _OPEN in text:
        calls: list[dict[str, Any]] = []
        for match in _HERMES.finditer(text):
            try:
                call = _call_from_obj(json.loads(match.group(1)))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = _HERMES.sub("", text).strip()
        return (content or None), calls
    calls_json = _json_calls(text)
    if calls_json:
        return None, calls_json
    return text, []


class ToolCallStream:
    """Feed text deltas; get ``("content", str)`` and ``("tool_call", dict)`` items."""

    def __init__(self) -> None:
        self._held = ""
        self._json: str | None = None  # the whole answer, once it looks like JSON calls
        self._in_call = False
        self._started = False  # some non-blank text has been seen
        self.calls: list[dict[str, Any]] = []

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        if self._json is not None:
            self._json += delta
            return []
        text = self._held + delta
        self._held = ""
        if not self._started:
            stripped = text.lstrip()
            if not stripped or any(lead.startswith(stripped) for lead in (_OPEN, *_JSON_LEADS)):
                self._held = text
                return []
            self._started = True
            if stripped[0] in "{[" or stripped.startswith(_JSON_LEADS):
                self._json = text
                return []
        out: list[tuple[str, Any]] = []
        while text:
            if not self._in_call:
                at = text.find(_OPEN)
                if at == -1:
                    keep = _partial_suffix(text, _OPEN)
                    if len(text) > keep:
                        out.append(("content", text[: len(text) - keep]))
                    self._held = text[len(text) - keep :]
                    break
                if at:
                    out.append(("content", text[:at]))
                self._in_call = True
                text = text[at + len(_OPEN) :]
            else:
                end = text.find(_CLOSE)
                if end == -1:
                    self._held = text
                    break
                out.extend(self._call(text[:end]))
                self._in_call = False
                text = text[end + len(_CLOSE) :]
        return out

    def finish(self) -> list[tuple[str, Any]]:
        """Whatever is left once the model stops."""
        if self._json is not None:
            calls = _json_calls(self._json)
            if calls:
                return self._record(calls)
            return [("content", self._json)] if self._json else []
        held, self._held = self._held, ""
        if self._in_call:
            self._in_call = False
            items = self._call(held)
            return items if items and items[0][0] == "tool_call" else [("content", _OPEN + held)]
        return [("content", held)] if held else []

    def _call(self, body: str) -> list[tuple[str, Any]]:
        try:
            call = _call_from_obj(json.loads(body))
        except ValueError:
            call = None
        if call is None:
            return [("content", _OPEN + body + _CLOSE)]
        return self._record([call])

    def _record(self, calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        self.calls.extend(calls)
        return [("tool_call", c) for c in calls]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
