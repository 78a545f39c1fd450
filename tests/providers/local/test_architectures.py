"""The continuous-batching engine on several architectures, in both CPU dtypes: its greedy
tokens equal plain ``generate()``'s, through the generic transformers forward (every
architecture) and the Llama fast path (Llama). Random weights, built here: no download.

Prompts of different lengths are prefilled together (padded, per-row masks) and one more
joins while the others decode, so the slot cache's prefill and decode writes and its
row moves are all exercised.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from providers.local.config import LocalTierConfig  # noqa: E402
from providers.local import build_local_provider  # noqa: E402
from providers.local.chat import LocalChatProvider  # noqa: E402
from providers.local.engine import BatchedEngine, EngineEvent  # noqa: E402
from providers.local.sampling import SamplingParams  # noqa: E402
from providers.schemas import ChatRequest  # noqa: E402
from tests.support.tiny_models import ARCHITECTURES, save_tiny_chat_model, tiny_causal_lm  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NEW_TOKENS = 16
PROMPT_LENGTHS = (5, 17, 9, 12)  # the last one joins mid-decode


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _generated(model: object, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            full = model.generate(  # type: ignore[attr-defined]
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, do_sample=False,
            )
            out.append(full[0, len(p):].tolist())
    return out


async def _engine_tokens(model: object, prompts: list[list[int]], *, fast_path: bool) -> list[list[int]]:
    loop = asyncio.get_running_loop()
    engine = BatchedEngine(model, eos_token_ids=frozenset(), max_context=256, max_batch=4,
                           fast_path=fast_path)
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [asyncio.Event() for _ in prompts]
    errors: list[BaseException] = []
    started = asyncio.Event()

    def sink(i: int):  # type: ignore[no-untyped-def]
        def put(event: EngineEvent) -> None:
            tokens[i].extend(event.token_ids)
            if len(tokens[0]) >= 4:
                started.set()
            if event.error is not None:
                errors.append(event.error)
            if event.finish_reason or event.error:
                done[i].set()
                started.set()
        return put

    engine.start()
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
        for i in range(len(prompts) - 1):
            engine.submit(prompts[i], params, sink(i), loop)
        await asyncio.wait_for(started.wait(), 60)
        engine.submit(prompts[-1], params, sink(len(prompts) - 1), loop)
        for event in done:
            await asyncio.wait_for(event.wait(), 60)
    finally:
        await asyncio.to_thread(engine.close)
    assert not errors, errors
    return tokens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
async def test_generic_forward_decodes_what_generate_does(arch: str, dtype: str) -> None:
    model = tiny_causal_lm(arch, DTYPES[dtype])
    prompts = _prompts(model.config.vocab_size)
    got = await _engine_tokens(model, prompts, fast_path=False)
    assert all(len(t) == NEW_TOKENS for t in got)
    assert got == _generated(model, prompts)


@pytest.mark.parametrize("dtype", DTYPES)
async def test_llama_fast_path_decodes_what_generate_does(dtype: str) -> None:
    model = tiny_causal_lm("llama", DTYPES[dtype])
    prompts = _prompts(model.config.vocab_size)
    engine = BatchedEngine(model, eos_token_ids=frozenset(), max_context=64, fast_path=True)
    assert engine._fast is not None, "a Llama model takes the fast path"
    got = await _engine_tokens(model, prompts, fast_path=True)
    assert got == _generated(model, prompts)


@pytest.mark.parametrize("dtype", DTYPES)
async def test_a_local_tier_on_a_qwen2_model_answers(tmp_path: Path, dtype: str) -> None:
    path = save_tiny_chat_model(tmp_path / "tiny-qwen2", "qwen2")
    provider = build_local_provider(
        LocalTierConfig(name="tiny", kind="local", model=str(path), dtype=dtype, max_output_tokens=8)
    )
    assert isinstance(provider, LocalChatProvider)
    await provider.start()
    try:
        assert await asyncio.wait_for(provider.wait_loaded(), 120), provider.load_error
        req = ChatRequest(model="tiny", messages=({"role": "user", "content": "Name three colours."},),
                          temperature=0.0)
        result = await asyncio.wait_for(provider.chat(req), 60)
        (choice,) = result.choices
        assert choice.finish_reason in ("length", "stop")
        assert 1 <= result.usage.completion_tokens <= 8
        assert result.usage.prompt_tokens > 5
        streamed = [c async for c in provider.stream(req.replace(stream=True))]
        text = "".join(c.choices[0].delta.get("content", "") for c in streamed if c.choices)
        assert text == choice.message["content"]  # greedy: the same answer both ways
    finally:
        await provider.aclose()
