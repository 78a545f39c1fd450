"""Streams: opening one on a tier (up to its first meaningful chunk), and reading it on
after that, settling each tier's part; when the tier breaks, either resume the text on
the next tier able to continue it (``stream_failover = "resume"``) or end with
``StreamBroken``, never a clean end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.attempt import Attempt, Outcome, Walk
from gateway.routing import StreamBroken, Tier, estimate_prompt_tokens
from providers.errors import CapacityError, FatalError, ProviderError, RetryableError
from providers.schemas import ChatChunk, ChatRequest, ChunkChoice, Usage

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class OpenStream:
    """A tier's stream after its first meaningful chunk: the chunks read so far (held
    back from the client until now) and how long the first one took."""

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


async def open_stream(attempt: Attempt, req: ChatRequest) -> OpenStream:
    """The attempt's call for a stream: start it on the attempt's tier and read up to its
    first meaningful chunk (role-only deltas are held back, so a stall right after them
    is still invisible), within the first-token timeout."""
    tier = attempt.tier
    first_token_timeout = attempt.walk.services.routing.first_token_timeout_s
    started = time.monotonic()
    it = tier.provider.stream(attempt.capped(req)).__aiter__()
    held: list[ChatChunk] = []
    try:
        timeout = min(first_token_timeout, max(attempt.walk.deadline - started, 0.001))
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await anext(it)
                except StopAsyncIteration:
                    raise RetryableError(
                        "upstream stream ended before its first token", tier=tier.name
                    ) from None
                held.append(chunk)
                if meaningful(chunk):
                    break
    except TimeoutError as exc:
        await aclose_quietly(it)
        raise RetryableError(f"no first token within {first_token_timeout:.1f}s", tier=tier.name) from exc
    except BaseException:
        await aclose_quietly(it)
        raise
    return OpenStream(iterator=it, held=held, started=started, ttft_s=time.monotonic() - started)


class ServedStream:
    """The rest of an opened stream. Iterate it for chunks; always ``aclose()`` it.

    Usage is settled with the ledger when each tier's part ends, however it ends. With
    ``stream_failover = "resume"`` a failure after the first byte continues on the next
    tier able to resume (``remaining``: the ranked tiers after the one serving);
    otherwise iteration raises ``StreamBroken``.
    """

    def __init__(self, walk: Walk, attempt: Attempt, opened: OpenStream, *, remaining: list[Tier]) -> None:
        self._walk = walk
        self._attempt = attempt
        self._opened = opened
        self._remaining = remaining
        self._text: dict[int, str] = {}
        self._pieces = 0
        self._usage: Usage | None = None
        self._settled = False  # the current tier's part
        self.tier = attempt.tier.name
        self.tiers_used = [attempt.tier.name]
        self.usage_total = Usage()

    @property
    def attempts(self) -> int:
        return self._walk.attempts

    def __aiter__(self) -> AsyncIterator[ChatChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[ChatChunk]:
        first = True
        while True:
            try:
                async for chunk in self._read_current(first):
                    yield chunk
            except (RetryableError, CapacityError) as exc:
                failed = self._attempt
                failed.failed(exc)
                await aclose_quietly(self._opened.iterator)
                self._settle_current("failed")
                if not await self._resume(exc):
                    raise StreamBroken(
                        f"tier {failed.tier.name} failed mid-stream: {exc.message}", tier=failed.tier.name
                    ) from exc
                first = False
                continue
            self._settle_current("ok")
            return

    async def _read_current(self, first: bool) -> AsyncIterator[ChatChunk]:
        opened = self._opened
        inter_token_timeout = self._walk.services.routing.inter_token_timeout_s
        tier_name = self._attempt.tier.name
        held, opened.held = opened.held, []
        for chunk in held:
            out = self._track(chunk, skip_role=not first)
            if out is not None:
                yield out
        it = opened.iterator
        while True:
            remaining = self._walk.deadline - time.monotonic()
            if remaining <= 0:
                raise RetryableError("request deadline passed mid-stream", tier=tier_name)
            timeout = min(inter_token_timeout, remaining)
            try:
                async with asyncio.timeout(timeout):
                    chunk = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                raise RetryableError(
                    f"no token for {timeout:.1f}s (inter-token timeout)", tier=tier_name
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

    def _settle_current(self, outcome: Outcome) -> None:
        """Settle the current tier's part: usage to the ledger, latency to health.
        ``outcome`` is "ok", "failed" (the tier broke) or "cancelled" (the client left)."""
        if self._settled:
            return
        self._settled = True
        attempt = self._attempt
        usage = self._usage or Usage(
            prompt_tokens=estimate_prompt_tokens(attempt.req) if self._pieces else 0,
            completion_tokens=self._pieces,
        )
        self.usage_total = self.usage_total + usage
        ttft = tpot = None
        if outcome == "ok":
            ttft = self._opened.ttft_s
            if usage.completion_tokens > 1:
                total = time.monotonic() - self._opened.started
                tpot = max(total - ttft, 0.0) / (usage.completion_tokens - 1)
        attempt.finish(usage, outcome, ttft_s=ttft, tpot_s=tpot)

    async def _resume(self, cause: ProviderError) -> bool:
        """Continue the answer on the next tier able to; False when none can."""
        current = self._attempt.req
        if self._walk.services.routing.stream_failover != "resume" or current.n != 1:
            return False
        prefix = self._text.get(0, "")
        req = current.replace(assistant_prefix=(current.assistant_prefix or "") + prefix)
        if req.max_tokens is not None:
            produced = self.usage_total.completion_tokens
            if produced >= req.max_tokens:
                return False
            req = req.replace(max_tokens=req.max_tokens - produced)
        self._text = {}
        while self._remaining:
            tier = self._remaining.pop(0)
            if not tier.provider.capabilities.resume:
                continue
            attempt = Attempt(self._walk, tier, req)
            if not attempt.available():
                continue
            if tier.priced and not await attempt.hold_budget():
                continue
            try:
                opened = await attempt.call(open_stream, req)
            except (RetryableError, CapacityError):
                continue  # recorded by the attempt
            except FatalError as exc:
                # Unlike before the first byte, the client's request is not at fault
                # here: this tier refused the continuation. The next one may take it.
                log.info("stream_resume_refused", tier=tier.name, reason=exc.message)
                continue
            log.info("stream_resumed", from_tier=self._attempt.tier.name, to_tier=tier.name,
                     cause=cause.message, prefix_chars=len(prefix))
            self._attempt, self._opened = attempt, opened
            self._settled = False
            self.tiers_used.append(tier.name)
            return True
        return False

    async def aclose(self) -> None:
        """Close the upstream (the client left, or the stream ended) and settle."""
        if not self._settled:
            await aclose_quietly(self._opened.iterator)
            self._settle_current("cancelled")
