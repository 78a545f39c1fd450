"""A stream after its first token: read it on, settle each tier's part with the ledger,
and when the tier breaks either resume the text on the next tier able to continue it
(``stream_failover = "resume"``) or end with ``StreamBroken``, never a clean end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gateway.routing import StreamBroken, Tier, Trail, estimate_prompt_tokens
from providers.errors import CapacityError, FatalError, ProviderError, RetryableError
from providers.schemas import ChatChunk, ChatRequest, ChunkChoice, Usage
from tracking import ApiKey, Hold, Refusal

if TYPE_CHECKING:
    from gateway.router import Router

log = structlog.get_logger(__name__)


@dataclass
class OpenStream:
    iterator: AsyncIterator[ChatChunk]
    held: list[ChatChunk]
    started: float
    ttft_s: float


def meaningful(chunk: ChatChunk) -> bool:
    if chunk.usage is not None and not chunk.choices:
        return True
    for c in chunk.choices:
        d = c.delta
        if d.get("content") or d.get("tool_calls") or d.get("function_call") or c.finish_reason:
            return True
    return False


async def aclose_quietly(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception as exc:  # a broken upstream may fail while closing; note it, go on
            log.debug("stream_close_failed", error=repr(exc))


def stream_call(router: Router, tier: Tier, req: ChatRequest, deadline: float) -> Awaitable[OpenStream]:
    """The router's attempt to open a stream on ``tier`` (see ``Router._open_on``)."""
    return router._open_on(tier, req, deadline)


class ServedStream:
    """The rest of an opened stream. Iterate it for chunks; always ``aclose()`` it.

    Usage is settled with the ledger when each tier's part ends, however it ends. With
    ``stream_failover = "resume"`` a failure after the first byte continues on the next
    tier able to resume; otherwise iteration raises ``StreamBroken``.
    """

    def __init__(
        self,
        *,
        router: Router,
        req: ChatRequest,
        key: ApiKey | None,
        deadline: float,
        trail: Trail,
        tier: Tier,
        hold: Hold | None,
        opened: OpenStream,
        remaining: list[Tier],
    ) -> None:
        self._router = router
        self._req = req
        self._key = key
        self._deadline = deadline
        self._trail = trail
        self._tier = tier
        self._hold = hold
        self._opened = opened
        self._remaining = remaining
        self._text: dict[int, str] = {}
        self._pieces = 0
        self._usage: Usage | None = None
        self._settled = False  # the current tier's part
        self.tier = tier.name
        self.tiers_used = [tier.name]
        self.usage_total = Usage()

    @property
    def attempts(self) -> int:
        return self._trail.attempts

    def __aiter__(self) -> AsyncIterator[ChatChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[ChatChunk]:
        first = True
        while True:
            try:
                async for chunk in self._read_current(first):
                    yield chunk
            except (RetryableError, CapacityError) as exc:
                failed = self._tier
                self._router._tier_failed(failed, exc, self._trail)
                await aclose_quietly(self._opened.iterator)
                self._settle_current(outcome="failed")
                if not await self._resume(exc):
                    raise StreamBroken(
                        f"tier {failed.name} failed mid-stream: {exc.message}", tier=failed.name
                    ) from exc
                first = False
                continue
            self._settle_current(outcome="ok")
            return

    async def _read_current(self, first: bool) -> AsyncIterator[ChatChunk]:
        opened = self._opened
        routing = self._router.routing
        held, opened.held = opened.held, []
        for chunk in held:
            out = self._track(chunk, skip_role=not first)
            if out is not None:
                yield out
        it = opened.iterator
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise RetryableError("request deadline passed mid-stream", tier=self._tier.name)
            timeout = min(routing.inter_token_timeout_s, remaining)
            try:
                async with asyncio.timeout(timeout):
                    chunk = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                raise RetryableError(
                    f"no token for {timeout:.1f}s (inter-token timeout)", tier=self._tier.name
                ) from exc
            out = self._track(chunk, skip_role=False)
            if out is not None:
                yield out

    def _track(self, chunk: ChatChunk, *, skip_role: bool) -> ChatChunk | None:
        """Note usage and text; drop the usage-only chunk (the API writes its own) and,
        on a resumed tier, the repeated role delta."""
        if chunk.usage is not None:
            self._usage = chunk.usage
        if not chunk.choices:
            return None
        choices = []
        for c in chunk.choices:
            content = c.delta.get("content")
            if content:
                self._text[c.index] = self._text.get(c.index, "") + content
                self._pieces += 1
            if skip_role and "role" in c.delta:
                delta = {k: v for k, v in c.delta.items() if k != "role"}
                if not delta and c.finish_reason is None:
                    continue
                c = ChunkChoice(index=c.index, delta=delta, finish_reason=c.finish_reason)
            choices.append(c)
        if not choices:
            return None
        return ChatChunk(choices=tuple(choices), model=chunk.model)

    def _settle_current(self, *, outcome: str) -> None:
        """Settle the current tier's part: usage to the ledger, latency to health.
        ``outcome`` is "ok", "failed" (the tier broke) or "cancelled" (the client left)."""
        if self._settled:
            return
        self._settled = True
        router, tier = self._router, self._tier
        usage = self._usage or Usage(
            prompt_tokens=estimate_prompt_tokens(self._req) if self._pieces else 0,
            completion_tokens=self._pieces,
        )
        self.usage_total = self.usage_total + usage
        tier.health.in_flight -= 1
        if outcome == "ok":
            tpot = None
            if usage.completion_tokens > 1:
                total = time.monotonic() - self._opened.started
                tpot = max(total - self._opened.ttft_s, 0.0) / (usage.completion_tokens - 1)
            tier.health.record_success(ttft_s=self._opened.ttft_s, tpot_s=tpot)
        elif outcome == "cancelled":
            tier.health.release_trial()
        router._settle(tier, self._req, self._key, self._hold, usage, self._trail, error=outcome == "failed")
        self._hold = None

    async def _resume(self, cause: ProviderError) -> bool:
        """Continue the answer on the next tier able to; False when none can."""
        router = self._router
        if router.routing.stream_failover != "resume" or self._req.n != 1:
            return False
        prefix = self._text.get(0, "")
        req = self._req.replace(assistant_prefix=(self._req.assistant_prefix or "") + prefix)
        if req.max_tokens is not None:
            produced = self.usage_total.completion_tokens
            if produced >= req.max_tokens:
                return False
            req = req.replace(max_tokens=req.max_tokens - produced)
        self._text = {}
        while self._remaining:
            tier = self._remaining.pop(0)
            if not (tier.provider.capabilities.resume and tier.provider.ready and tier.health.allow()):
                continue
            outcome = await router._hold_for(req, tier, self._key, None, False)
            if isinstance(outcome, Refusal):
                tier.health.release_trial()
                continue
            tier_req = router._bounded(req, tier)
            tier.health.in_flight += 1
            try:
                opened = await router._call_with_retries(
                    tier, self._trail, self._deadline, stream_call, tier_req
                )
            except (RetryableError, CapacityError) as exc:
                tier.health.in_flight -= 1
                router._tier_failed(tier, exc, self._trail)
                router._settle(tier, req, self._key, outcome, Usage(), self._trail, error=True)
                continue
            except FatalError:
                tier.health.in_flight -= 1
                tier.health.release_trial()
                router._release(outcome)
                continue
            log.info("stream_resumed", from_tier=self._tier.name, to_tier=tier.name,
                     cause=cause.message, prefix_chars=len(prefix))
            self._req = req
            self._tier, self._hold, self._opened = tier, outcome, opened
            self._settled = False
            self.tiers_used.append(tier.name)
            return True
        return False

    async def aclose(self) -> None:
        """Close the upstream (the client left, or the stream ended) and settle."""
        if not self._settled:
            await aclose_quietly(self._opened.iterator)
            self._settle_current(outcome="cancelled")
