"""An engine that cannot die silently: a failing step fails only the sequences it carried;
a dead engine thread makes the engine refuse at once, and it comes back on its own.

Faults are injected with the engine's test hook (``fault_hook``, called before the
admission, each prefill and each decode step), on a small random-weight Llama.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from providers.local.config import LocalTierConfig  # noqa: E402
from providers.errors import CapacityError, RetryableError  # noqa: E402
from providers.local import build_local_provider  # noqa: E402
from providers.local.chat import LocalChatProvider  # noqa: E402
from providers.local.engine import BatchedEngine, EngineEvent  # noqa: E402
from providers.local.sampling import SamplingParams  # noqa: E402
from providers.schemas import ChatRequest  # noqa: E402
from tests.support.tiny_models import save_tiny_chat_model, tiny_causal_lm  # noqa: E402


class Fault(RuntimeError):
    pass


def fail_once(stage: str) -> Callable[[str], None]:
    """A hook that raises ``Fault`` the first time ``stage`` comes round, then never."""
    fired = False

    def hook(at: str) -> None:
        nonlocal fired
        if at == stage and not fired:
            fired = True
            raise Fault(f"injected fault in {stage}")

    return hook


class Seq:
    """One submitted sequence's events, awaitable until it ends."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.ended = asyncio.Event()

    def __call__(self, event: EngineEvent) -> None:
        self.tokens.extend(event.token_ids)
        if event.error is not None:
            self.error = event.error
        if event.finish_reason is not None:
            self.finish = event.finish_reason
        if event.error is not None or event.finish_reason is not None:
            self.ended.set()

    async def until(self, tokens: int) -> None:
        for _ in range(1200):
            if len(self.tokens) >= tokens or self.ended.is_set():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"only {len(self.tokens)} tokens after 6 s")

    async def end(self) -> None:
        await asyncio.wait_for(self.ended.wait(), 60)


@pytest.fixture(scope="module")
def model() -> object:
    return tiny_causal_lm("llama", torch.float32)


@pytest.fixture
async def engine(model: object) -> AsyncIterator[BatchedEngine]:
    engine = BatchedEngine(model, eos_token_ids=frozenset(), max_context=256, max_batch=4,
                           restart_backoff_s=0.3)
    engine.start()
    yield engine
    await asyncio.to_thread(engine.close)


def submit(engine: BatchedEngine, tokens: int, prompt: tuple[int, ...] = (5, 6, 7, 8)) -> Seq:
    seq = Seq()
    engine.submit(list(prompt), SamplingParams(max_new_tokens=tokens, temperature=0.0), seq,
                  asyncio.get_running_loop())
    return seq


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout} s: {what}")


async def test_a_failing_prefill_fails_only_the_sequences_it_carried(engine: BatchedEngine) -> None:
    running = submit(engine, 60)
    await running.until(3)
    engine.fault_hook = fail_once("prefill")
    joining = submit(engine, 10, prompt=(9, 10, 11))
    await joining.end()
    assert isinstance(joining.error, CapacityError)
    assert "failed on this request" in joining.error.message and "injected fault" in joining.error.message
    await running.end()
    assert running.error is None and running.finish == "length" and len(running.tokens) == 60
    assert engine.step_failures == 1 and engine.down_reason is None
    after = submit(engine, 5)
    await after.end()
    assert after.finish == "length" and len(after.tokens) == 5


async def test_a_failing_decode_fails_its_batch_and_the_engine_goes_on(engine: BatchedEngine) -> None:
    a, b = submit(engine, 60), submit(engine, 60, prompt=(3, 4))
    await a.until(2)
    engine.fault_hook = fail_once("decode")
    await a.end()
    await b.end()
    assert isinstance(a.error, CapacityError) and isinstance(b.error, CapacityError)
    assert engine.active == 0 and engine.down_reason is None
    after = submit(engine, 5)
    await after.end()
    assert after.error is None and len(after.tokens) == 5


async def test_a_dead_engine_thread_refuses_at_once_then_restarts(engine: BatchedEngine) -> None:
    engine.fault_hook = fail_once("admit")
    victim = submit(engine, 20)
    await victim.end()
    assert isinstance(victim.error, CapacityError) and "died" in victim.error.message
    assert engine.down_reason is not None and "injected fault" in engine.down_reason
    with pytest.raises(RetryableError, match="died"):
        submit(engine, 5)
    await until(lambda: engine.down_reason is None, "the engine restarted")
    assert engine.restarts == 1
    after = submit(engine, 5)
    await after.end()
    assert after.error is None and len(after.tokens) == 5


async def test_the_tier_says_its_engine_is_down_and_comes_back(tmp_path: Path) -> None:
    path = save_tiny_chat_model(tmp_path / "tiny", "llama")
    provider = build_local_provider(LocalTierConfig(name="tiny", kind="local", model=str(path)))
    assert isinstance(provider, LocalChatProvider)
    await provider.start()
    try:
        assert await asyncio.wait_for(provider.wait_loaded(), 120), provider.load_error
        engine = provider.engine
        assert engine is not None
        engine.fault_hook = fail_once("admit")
        req = ChatRequest(model="tiny", messages=({"role": "user", "content": "Hi"},),
                          max_tokens=4, temperature=0.0)
        with pytest.raises(CapacityError, match="died"):
            await asyncio.wait_for(provider.chat(req), 30)
        assert not provider.ready
        health = await provider.probe()
        assert not health.ok and "engine down" in health.detail
        await until(lambda: provider.ready, "the tier is ready again")
        result = await asyncio.wait_for(provider.chat(req), 30)
        assert result.usage.completion_tokens >= 1
    finally:
        await provider.aclose()
