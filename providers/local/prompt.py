"""From OpenAI messages to prompt token ids, with the tokenizer's own chat template.

Messages are normalised for templates (text parts joined, ``None`` content as empty,
tool-call arguments as mappings). ``tools`` go to the template; a template that knows
nothing of tools gets a Hermes-style tool description in the system message instead, so
the model still learns the tools and the ``<tool_call>`` format the parser reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from providers.errors import FatalError

_TOOL_PROMPT = (
    "You can call functions. The available functions, as JSON schemas:\n<tools>\n{tools}\n"
    "</tools>\nTo call a function, answer only with\n"
    '<tool_call>{{"name": <function name>, "arguments": <arguments object>}}</tool_call>'
)


def _template_source(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return " ".join(str(t) for t in template.values())
    return str(template or "")


class PromptBuilder:
    """Renders requests for one tokenizer; blocking (run it off the event loop)."""

    def __init__(self, tokenizer: Any, *, tier: str = "") -> None:
        self._tokenizer = tokenizer
        self._tier = tier
        source = _template_source(tokenizer)
        self.template_knows_tools = "tools" in source
        self.template_knows_tool_calls = "tool_calls" in source

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        assistant_prefix: str | None = None,
    ) -> str:
        msgs = [self._message(m) for m in messages]
        kwargs: dict[str, Any] = {}
        if tools:
            if self.template_knows_tools:
                kwargs["tools"] = [dict(t) for t in tools]
            else:
                msgs = self._with_tool_prompt(msgs, tools)
        if assistant_prefix is not None:
            msgs.append({"role": "assistant", "content": assistant_prefix})
            kwargs.update(add_generation_prompt=False, continue_final_message=True)
        else:
            kwargs["add_generation_prompt"] = True
        try:
            return self._tokenizer.apply_chat_template(msgs, tokenize=False, **kwargs)
        except (ValueError, TypeError, KeyError) as exc:
            raise FatalError(
                f"the model's chat template cannot render these messages: {exc}",
                tier=self._tier, code="invalid_messages", param="messages",
            ) from exc
        except Exception as exc:  # jinja2 TemplateError and friends
            if type(exc).__module__.startswith("jinja2"):
                raise FatalError(
                    f"the model's chat template rejected these messages: {exc}",
                    tier=self._tier, code="invalid_messages", param="messages",
                ) from exc
            raise

    def encode(self, text: str) -> list[int]:
        # The template already holds the special tokens it wants.
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _message(self, message: Mapping[str, Any]) -> dict[str, Any]:
        msg = dict(message)
        if msg.get("role") == "developer":
            msg["role"] = "system"
        msg["content"] = _text_content(msg.get("content"), self._tier)
        calls = msg.get("tool_calls")
        if calls:
            normalised = [_call_for_template(c) for c in calls]
            if self.template_knows_tool_calls:
                msg["tool_calls"] = normalised
            else:
                del msg["tool_calls"]
                rendered = "".join(
                    "<tool_call>"
                    + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                    + "</tool_call>"
                    for c in normalised
                )
                msg["content"] = (msg["content"] + "\n" + rendered).strip()
        return msg

    @staticmethod
    def _with_tool_prompt(msgs: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        described = "\n".join(json.dumps(dict(t).get("function", t)) for t in tools)
        text = _TOOL_PROMPT.format(tools=described)
        if msgs and msgs[0].get("role") == "system":
            first = dict(msgs[0])
            first["content"] = (first["content"] + "\n\n" + text).strip()
            return [first, *msgs[1:]]
        return [{"role": "system", "content": text}, *msgs]


def _text_content(content: Any, tier: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise FatalError(
                    f"this model takes text only; a {kind!r} content part cannot be honoured",
                    tier=tier, code="unsupported_content", param="messages",
                )
        return "".join(texts)
    return str(content)


def _call_for_template(call: Mapping[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            pass  # leave odd arguments as the client sent them
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": fn.get("name", ""), "arguments": args},
    }
