"""The router: walk the tiers a policy ranked, with retries, circuit breaking, budget
holds and deadlines, until one serves.

- Retryable errors are retried with backoff (tenacity) inside the request deadline, then
  the next tier is tried. Capacity errors fail over at once. Fatal (client) errors go
  back to the client at once.
- A priced tier is only called under a budget hold; a refused hold skips the tier.
- A stream is "opened" when its first meaningful chunk arrived: every failure before that
  is invisible to the client. After it, a failure either resumes on a tier able to
  continue the text (``stream_failover = "resume"``) or ends the stream with an error
  event (``StreamBroken``); never a clean end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from gateway.config import RoutingConfig
from gateway.health import TierHealth
from gateway.tasks import BackgroundTasks
from policies.base import Policy, TierView
from policies.file_order import FileOrder
from providers.base import Provider
from providers.config import TierConfig
from providers.errors import CapacityError, FatalError, ProviderError, RetryableError
from providers.schemas import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    ChunkChoice,
    EmbeddingRequest,
    EmbeddingResult,
    Usage,
)
from tracking import ApiKey, Hold, HoldRequest, Ledger, PriceTable, Refusal, UsageEvent

log = structlog.get_logger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class RoutingError(Exception):
    """No tier served. Carries what the client should see."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type_
        self.headers = headers or {}
        self.attempts = attempts


class StreamBroken(Exception):
    """A stream failed after its first byte reached the client and could not resume."""

    def __init__(self, message: str, *, tier: str) -> None:
        super().__init__(message)
        self.message = message
        self.tier = tier


@dataclass
class Tier:
    cfg: TierConfig
    provider: Provider
    health: TierHealth
    position: int

    @property
    def name(self) -> str:
        return self.cfg.name


@dataclass
class Served(Generic[T]):
    result: T
    tier: str
    attempts: int


@dataclass
class _Trail:
    """What happened while routing one request, for the error message and the log."""

    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    # Tokens admit() charged to the key's tokens-per-minute; the first settle corrects it.
    admitted_tokens: int | None = None

    def take_admitted(self) -> int | None:
        tokens, self.admitted_tokens = self.admitted_tokens, None
        return tokens


def estimate_prompt_tokens(req: ChatRequest) -> int:
    """An upper bound on the prompt's tokens without a tokenizer: a token of any BPE
    vocabulary covers at least one byte, and each message adds a few template tokens."""
    total = 3
    for m in req.messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif content is not None:
            total += len(json.dumps(content, separators=(",", ":")).encode())
        if m.get("tool_calls"):
            total += len(json.dumps(m["tool_calls"], separators=(",", ":")).encode())
        total += 8
    if req.tools:
        total += len(json.dumps(req.tools, separators=(",", ":")).encode())
    if req.assistant_prefix:
        total += len(req.assistant_prefix.encode())
    return total


class Router:
    def __init__(
        self,
        *,
        tiers: Sequence[Tier],
        policy: Policy,
        routing: RoutingConfig,
        ledger: Ledger,
        prices: PriceTable,
        background: BackgroundTasks,
    ) -> None:
        self.tiers = {t.name: t for t in tiers}
        self.policy = policy
        self.routing = routing
        self.ledger = ledger
        self.prices = prices
        self.background = background
        self._priced = frozenset(t.name for t in tiers if prices.is_priced(t.name))
        self._file_order = type(policy) is FileOrder
        # (task, public model name) -> the tiers that answer it, in file order.
        self._answering: dict[tuple[str, str], list[Tier]] = {}

    def _is_priced(self, tier: Tier) -> bool:
        return tier.name in self._priced

    # -- choosing -------------------------------------------------------------------

    def public_models(self, task: str = "chat") -> list[str]:
        names: list[str] = []
        for t in self.tiers.values():
            if t.cfg.task == task:
                public = [m for m in t.cfg.public_models if m != "auto"] or [t.cfg.model]
                names.extend(m for m in public if m not in names)
        return names

    def candidates(self, model: str, key: ApiKey | None, task: str) -> list[Tier]:
        """Tiers that answer ``model`` for this caller; 404/403 when there are none."""
        answering = self._answering.get((task, model))
        if answering is None:
            answering = [
                t for t in self.tiers.values() if t.cfg.task == task and t.cfg.answers(model)
            ]
            if len(self._answering) < 1024:  # names are the client's: bound the cache
                self._answering[(task, model)] = answering
        if not answering:
            raise RoutingError(
                f"The model `{model}` does not exist or is not served here.",
                status=404,
                code="model_not_found",
            )
        if key is not None:
            if not key.may_use_model(model):
                raise RoutingError(
                    f"This API key may not use the model `{model}`.",
                    status=403,
                    code="model_not_allowed",
                    type_="permission_error",
                )
            answering = [t for t in answering if key.may_use_tier(t.name)]
            if not answering:
                raise RoutingError(
                    f"This API key may not use any tier that serves `{model}`.",
                    status=403,
                    code="tier_not_allowed",
                    type_="permission_error",
                )
        return answering

    def _ranked(self, req: ChatRequest, tiers: list[Tier]) -> list[Tier]:
        if self._file_order:
            return tiers  # candidates come in file order already: no views to build
        views = [self.view(t) for t in tiers]
        order = self.policy.rank(req, views)
        return [self.tiers[n] for n in order if n in self.tiers]

    def view(self, t: Tier) -> TierView:
        h = t.health
        circuit_open = h.state == "open"
        return TierView(
            name=t.name,
            kind=t.cfg.kind,
            position=t.position,
            price_input=t.cfg.price.input,
            price_output=t.cfg.price.output,
            healthy=t.provider.ready and not circuit_open,
            circuit_open=circuit_open,
            ttft_ewma_s=h.ttft_ewma_s,
            tpot_ewma_s=h.tpot_ewma_s,
            in_flight=h.in_flight,
        )

    # -- budget ---------------------------------------------------------------------

    def _max_output(self, req: ChatRequest, tier: Tier) -> int:
        return req.max_tokens if req.max_tokens is not None else tier.cfg.max_output_tokens

    def _hold_request(self, req: ChatRequest, tier: Tier, key: ApiKey | None) -> HoldRequest:
        amount = self.prices.worst_case_micros(
            tier.name,
            tier.cfg.model,
            estimate_prompt_tokens(req),
            self._max_output(req, tier) * max(req.n, 1),
        )
        return HoldRequest(
            tier=tier.name, model=req.model, key=key.name if key else None, amount_micros=amount
        )

    def _bounded(self, req: ChatRequest, tier: Tier) -> ChatRequest:
        """A priced tier never runs without an output cap: the hold assumed one."""
        if req.max_tokens is not None or not self._is_priced(tier):
            return req
        cap = tier.cfg.max_output_tokens
        body = dict(req.body)
        body["max_tokens"] = cap
        return req.replace(max_tokens=cap, body=body)

    async def _admit(
        self, req: ChatRequest, ranked: list[Tier], key: ApiKey | None, trail: _Trail
    ) -> Hold | Refusal | None:
        """Rate limits and the first priced tier's hold, in one ledger round trip."""
        first = ranked[0] if ranked else None
        hold_req = None
        if first is not None and self._is_priced(first) and first.health.state != "open":
            hold_req = self._hold_request(req, first, key)
        if hold_req is None and (key is None or not key.has_rate_limits):
            return None  # nothing to check: no ledger call at all
        tokens = estimate_prompt_tokens(req) + (req.max_tokens or 0)
        admission = await self.ledger.admit(key=key, tokens=tokens, hold=hold_req)
        if key is not None and key.tpm is not None:
            trail.admitted_tokens = tokens
        if admission.rate_limited is not None:
            limited = admission.rate_limited
            retry_after = max(1, int(limited.retry_after_s + 0.999))
            raise RoutingError(
                f"Rate limit reached: {limited.message}",
                status=429,
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
        if admission.hold is not None:
            return admission.hold
        return admission.refusal

    async def _hold_for(
        self,
        req: ChatRequest,
        tier: Tier,
        key: ApiKey | None,
        first_outcome: Hold | Refusal | None,
        is_first: bool,
    ) -> Hold | Refusal | None:
        if not self._is_priced(tier):
            return None
        if is_first and first_outcome is not None:
            return first_outcome
        return await self.ledger.reserve(self._hold_request(req, tier, key))

    def _settle(
        self,
        tier: Tier,
        req: ChatRequest,
        key: ApiKey | None,
        hold: Hold | None,
        usage: Usage,
        trail: _Trail,
        *,
        error: bool = False,
    ) -> None:
        cost = 0
        if self._is_priced(tier):
            cost = self.prices.cost_micros(
                tier.name, tier.cfg.model, usage.prompt_tokens, usage.completion_tokens
            )
        event = UsageEvent(
            tier=tier.name,
            model=req.model,
            key=key.name if key else None,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_micros=cost,
            error=error,
            admitted_tokens=trail.take_admitted(),
        )
        if hold is not None and hold.budgets:
            # Money is held in Redis: settle it now, in one round trip.
            self.background.spawn(self.ledger.commit(hold, event), name="ledger_commit")
        else:
            # Batched with other usage into one script call every few ms; no task here.
            self.ledger.record(event)

    def _release(self, hold: Hold | None) -> None:
        if hold is not None:
            self.background.spawn(self.ledger.release(hold), name="ledger_release")

    # -- one tier, with retries -------------------------------------------------------

    def _retrying(self, deadline: float) -> AsyncRetrying:
        r = self.routing
        backoff = wait_exponential(
            multiplier=r.backoff_initial_s, max=r.backoff_max_s, exp_base=r.backoff_multiplier
        )

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, RetryableError) and exc.retry_after is not None:
                return exc.retry_after
            return backoff(state)

        def stop_at_deadline(state: RetryCallState) -> bool:
            upcoming = state.upcoming_sleep or 0.0
            return time.monotonic() + upcoming >= deadline

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, RetryableError) and (
                exc.retry_after is None or exc.retry_after <= r.max_retry_after_s
            )

        return AsyncRetrying(
            stop=stop_after_attempt(r.retries + 1) | stop_at_deadline,
            wait=wait,
            retry=retry_if_exception(retryable),
            reraise=True,
        )

    async def _call_with_retries(
        self,
        tier: Tier,
        trail: _Trail,
        deadline: float,
        call: Callable[[], Awaitable[T]],
    ) -> T:
        """``call()`` on one tier, retried while retryable and time remains.

        The first try runs before any tenacity machinery is built (most calls succeed at
        once, and building it costs more than a call to a loopback upstream). Its
        retryable failure becomes tenacity's first attempt, so every decision after it
        (retry or not, wait, stop) is the one tenacity makes.
        """
        try:
            return await self._try_once(tier, trail, deadline, call)
        except RetryableError as exc:
            first_failure: RetryableError | None = exc
        async for attempt in self._retrying(deadline):
            with attempt:
                if first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
                return await self._try_once(tier, trail, deadline, call)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _try_once(
        self,
        tier: Tier,
        trail: _Trail,
        deadline: float,
        call: Callable[[], Awaitable[T]],
    ) -> T:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RetryableError("request deadline passed", tier=tier.name)
        trail.attempts += 1
        timeout = min(tier.cfg.timeout_s, remaining)
        try:
            async with asyncio.timeout(timeout):
                return await call()
        except TimeoutError as exc:
            if tier.cfg.kind == "local":
                # The same generation would run out of time again: move on, don't retry.
                raise CapacityError(f"timed out after {timeout:.1f}s", tier=tier.name) from exc
            raise RetryableError(
                f"timed out after {timeout:.1f}s", tier=tier.name
            ) from exc

    # -- the walk ---------------------------------------------------------------------

    async def _walk(
        self,
        req: ChatRequest,
        key: ApiKey | None,
        deadline: float,
        task: str,
        run: Callable[[Tier, Any, _Trail], Awaitable[T]],
        original: Any,
        on_success: Callable[[Tier, Hold | None, T, _Trail, list[Tier]], R],
    ) -> R:
        """Try ranked tiers until ``run`` succeeds on one; ``on_success`` takes over the
        tier's in-flight count and hold from there."""
        tiers = self.candidates(req.model, key, task)
        ranked = self._ranked(req, tiers)
        trail = _Trail()
        first_outcome = await self._admit(req, ranked, key, trail)
        for i, tier in enumerate(ranked):
            if not tier.provider.ready:
                trail.failures.append(f"{tier.name}: not ready")
                continue
            if not tier.health.allow():
                trail.failures.append(f"{tier.name}: circuit open")
                continue
            outcome = await self._hold_for(req, tier, key, first_outcome, i == 0)
            if isinstance(outcome, Refusal):
                trail.refusals.append(outcome)  # the ledger logged it
                tier.health.release_trial()
                continue
            tier_req = self._bounded(req, tier) if task == "chat" else original
            tier.health.in_flight += 1
            try:
                result = await run(tier, tier_req, trail)
            except (RetryableError, CapacityError) as exc:
                tier.health.in_flight -= 1
                self._tier_failed(tier, exc, trail)
                self._settle(tier, req, key, outcome, Usage(), trail, error=True)
                continue
            except BaseException:  # FatalError, cancellation: not the tier's fault
                tier.health.in_flight -= 1
                tier.health.release_trial()
                self._release(outcome)
                raise
            return on_success(tier, outcome, result, trail, ranked[i + 1 :])
        raise self._exhausted(req, trail)

    def _tier_failed(self, tier: Tier, exc: ProviderError, trail: _Trail) -> None:
        reason = f"{tier.name}: {exc.message}"
        trail.failures.append(reason)
        opened = tier.health.record_failure(exc.message)
        log.warning(
            "tier_failed",
            tier=tier.name,
            error=type(exc).__name__,
            reason=exc.message,
            status=exc.status,
            circuit_opened=opened,
        )

    def _exhausted(self, req: ChatRequest, trail: _Trail) -> RoutingError:
        if trail.refusals and not trail.failures:
            r = trail.refusals[0]
            return RoutingError(
                f"Budget exhausted: {r.message}",
                status=429,
                code="budget_exceeded",
                type_="insufficient_quota",
                attempts=trail.attempts,
            )
        parts = trail.failures + [f"{r.scope}: {r.message}" for r in trail.refusals]
        return RoutingError(
            "No tier could serve this request: " + "; ".join(parts or ["no tier available"]),
            status=503,
            code="no_tier_available",
            type_="server_error",
            attempts=trail.attempts,
        )

    def _whole_answer(
        self, req: ChatRequest, key: ApiKey | None, started: float
    ) -> Callable[[Tier, Hold | None, Any, _Trail, list[Tier]], Served[Any]]:
        def done(tier: Tier, hold: Hold | None, result: Any, trail: _Trail, _rest: list[Tier]) -> Served[Any]:
            tier.health.in_flight -= 1
            tier.health.record_success(ttft_s=time.monotonic() - started)
            self._settle(tier, req, key, hold, result.usage, trail)
            return Served(result=result, tier=tier.name, attempts=trail.attempts)

        return done

    # -- chat and embeddings ------------------------------------------------------------

    async def chat(self, req: ChatRequest, key: ApiKey | None, deadline: float) -> Served[ChatResult]:
        async def run(tier: Tier, r: ChatRequest, trail: _Trail) -> ChatResult:
            return await self._call_with_retries(tier, trail, deadline, lambda: tier.provider.chat(r))

        started = time.monotonic()
        return await self._walk(req, key, deadline, "chat", run, req, self._whole_answer(req, key, started))

    async def embed(
        self, req: EmbeddingRequest, key: ApiKey | None, deadline: float
    ) -> Served[EmbeddingResult]:
        # Policies and holds see an embedding as a prompt with no output.
        as_chat = ChatRequest(
            model=req.model,
            messages=tuple({"role": "user", "content": text} for text in req.inputs),
            max_tokens=0,
            request_id=req.request_id,
        )

        async def run(tier: Tier, r: EmbeddingRequest, trail: _Trail) -> EmbeddingResult:
            return await self._call_with_retries(tier, trail, deadline, lambda: tier.provider.embed(r))

        started = time.monotonic()
        return await self._walk(
            as_chat, key, deadline, "embeddings", run, req, self._whole_answer(as_chat, key, started)
        )

    # -- streams ------------------------------------------------------------------------

    async def open_stream(
        self, req: ChatRequest, key: ApiKey | None, deadline: float
    ) -> ServedStream:
        """Return once a tier produced its first meaningful chunk (failures before that
        are invisible); the rest of the stream is read from the returned object, which
        settles usage when it ends."""

        async def run(tier: Tier, r: ChatRequest, trail: _Trail) -> _OpenStream:
            return await self._call_with_retries(
                tier, trail, deadline, lambda: self._open_on(tier, r, deadline)
            )

        def opened(tier: Tier, hold: Hold | None, stream: _OpenStream, trail: _Trail, rest: list[Tier]) -> ServedStream:
            return ServedStream(
                router=self, req=req, key=key, deadline=deadline, trail=trail,
                tier=tier, hold=hold, opened=stream, remaining=rest,
            )

        return await self._walk(req, key, deadline, "chat", run, req, opened)

    async def _open_on(self, tier: Tier, req: ChatRequest, deadline: float) -> _OpenStream:
        """Start a stream and read up to its first meaningful chunk (role-only deltas are
        held back, so a stall right after them is still invisible)."""
        started = time.monotonic()
        it = tier.provider.stream(req).__aiter__()
        held: list[ChatChunk] = []
        try:
            timeout = min(self.routing.first_token_timeout_s, max(deadline - started, 0.001))
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        chunk = await anext(it)
                    except StopAsyncIteration:
                        raise RetryableError(
                            "upstream stream ended before its first token", tier=tier.name
                        ) from None
                    held.append(chunk)
                    if _meaningful(chunk):
                        break
        except TimeoutError as exc:
            await _aclose(it)
            raise RetryableError(
                f"no first token within {self.routing.first_token_timeout_s:.1f}s", tier=tier.name
            ) from exc
        except BaseException:
            await _aclose(it)
            raise
        return _OpenStream(iterator=it, held=held, started=started, ttft_s=time.monotonic() - started)


@dataclass
class _OpenStream:
    iterator: AsyncIterator[ChatChunk]
    held: list[ChatChunk]
    started: float
    ttft_s: float


def _meaningful(chunk: ChatChunk) -> bool:
    if chunk.usage is not None and not chunk.choices:
        return True
    for c in chunk.choices:
        d = c.delta
        if d.get("content") or d.get("tool_calls") or d.get("function_call") or c.finish_reason:
            return True
    return False


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception as exc:  # a broken upstream may fail while closing; note it, go on
            log.debug("stream_close_failed", error=repr(exc))


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
        trail: _Trail,
        tier: Tier,
        hold: Hold | None,
        opened: _OpenStream,
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
                await _aclose(self._opened.iterator)
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
                    tier, self._trail, self._deadline,
                    lambda: router._open_on(tier, tier_req, self._deadline),
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
            await _aclose(self._opened.iterator)
            self._settle_current(outcome="cancelled")
