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
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from gateway.config import RoutingConfig
from gateway.routing import (
    RoutingError,
    Served,
    Tier,
    Trail,
    estimate_prompt_tokens,
)
from gateway.streaming import OpenStream, ServedStream, aclose_quietly, meaningful, stream_call
from gateway.tasks import BackgroundTasks
from policies.base import Policy, TierView
from policies.file_order import FileOrder
from providers.errors import CapacityError, ProviderError, RetryableError
from providers.schemas import (
    ChatChunk,
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    Usage,
)
from tracking import ApiKey, Hold, HoldRequest, Ledger, PriceTable, Refusal, UsageEvent

log = structlog.get_logger(__name__)
# One attempt on a tier, per kind of request: a plain function of (router, tier, request,
# deadline) rather than a closure, so nothing is built per request to make the call.
Call = Callable[["Router", Tier, Any, float], Awaitable[Any]]


def _chat_call(router: Router, tier: Tier, req: ChatRequest, deadline: float) -> Awaitable[ChatResult]:
    return tier.provider.chat(req)


def _embed_call(router: Router, tier: Tier, req: EmbeddingRequest, deadline: float) -> Awaitable[EmbeddingResult]:
    return tier.provider.embed(req)


# A tier served: (tier, its hold, the call's result, the trail, the ranked tiers and the
# serving tier's place among them, when the successful attempt started).
Walked = tuple[Tier, "Hold | None", Any, Trail, list[Tier], int, float]
# What a successful walk becomes, per kind of request; a plain function, like Call.
Finish = Callable[["Router", ChatRequest, "ApiKey | None", float, Walked], Any]


def _whole_answer(router: Router, req: ChatRequest, key: ApiKey | None, deadline: float, walked: Walked) -> Served[Any]:
    tier, hold, result, trail, _, _, started = walked
    health = tier.health
    health.in_flight -= 1
    health.record_success(time.monotonic() - started)
    router._settle(tier, req, key, hold, result.usage, trail)
    return Served(result=result, tier=tier.name, attempts=trail.attempts)


def _opened_stream(router: Router, req: ChatRequest, key: ApiKey | None, deadline: float, walked: Walked) -> ServedStream:
    tier, hold, stream, trail, ranked, place, _ = walked
    return ServedStream(
        router=router, req=req, key=key, deadline=deadline, trail=trail,
        tier=tier, hold=hold, opened=stream, remaining=ranked[place + 1 :],
    )

__all__ = ["Router"]


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
        for t in tiers:
            t.priced = prices.is_priced(t.name)
        self._file_order = type(policy) is FileOrder
        # (task, public model name) -> the tiers that answer it, in file order.
        self._answering: dict[tuple[str, str], list[Tier]] = {}

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
        if req.max_tokens is not None or not tier.priced:
            return req
        cap = tier.cfg.max_output_tokens
        body = dict(req.body)
        body["max_tokens"] = cap
        return req.replace(max_tokens=cap, body=body)

    async def _admit(
        self, req: ChatRequest, first: Tier | None, key: ApiKey | None, trail: Trail
    ) -> Hold | Refusal | None:
        """Rate limits and the first priced tier's hold, in one ledger round trip."""
        hold_req = self._hold_request(req, first, key) if first is not None else None
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
        if not tier.priced:
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
        trail: Trail,
        *,
        error: bool = False,
    ) -> None:
        cost = 0
        if tier.priced:
            cost = self.prices.cost_micros(
                tier.name, tier.cfg.model, usage.prompt_tokens, usage.completion_tokens
            )
        event = UsageEvent(  # (tier, model, key, prompt, completion, cost, error)
            tier.name, req.model, key.name if key else None, usage.prompt_tokens,
            usage.completion_tokens, cost, error,
            admitted_tokens=trail.take_admitted() if trail.admitted_tokens is not None else None,
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
        self, tier: Tier, trail: Trail, deadline: float, call: Call, req: Any
    ) -> Any:
        """``call(self, tier, req, deadline)``, retried while retryable and time remains.

        The first try runs before any tenacity machinery is built (most calls succeed at
        once, and building it costs more than a call to a loopback upstream). Its
        retryable failure becomes tenacity's first attempt, so every decision after it
        (retry or not, wait, stop) is the one tenacity makes.
        """
        try:
            return await self._try_once(tier, trail, deadline, call, req)
        except RetryableError as exc:
            return await self._retry(exc, tier, trail, deadline, call, req)

    async def _retry(
        self, failure: RetryableError, tier: Tier, trail: Trail, deadline: float, call: Call, req: Any
    ) -> Any:
        """The attempts after a first retryable ``failure``, as tenacity decides."""
        first_failure: RetryableError | None = failure
        async for attempt in self._retrying(deadline):
            with attempt:
                if first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
                return await self._try_once(tier, trail, deadline, call, req)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _try_once(
        self, tier: Tier, trail: Trail, deadline: float, call: Call, req: Any
    ) -> Awaitable[Any]:
        """One attempt: the awaitable of ``call``, under a timer unless the tier's own
        timeout ends it before the deadline. Not a coroutine itself, so the common case
        adds no frame that every suspension of the call passes through."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RetryableError("request deadline passed", tier=tier.name)
        trail.attempts += 1
        timeout = tier.cfg.timeout_s
        if tier.self_timed and timeout <= remaining:
            return call(self, tier, req, deadline)
        return self._timed(tier, min(timeout, remaining), call(self, tier, req, deadline))

    @staticmethod
    async def _timed(tier: Tier, timeout: float, attempt: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await attempt
        except TimeoutError as exc:
            if not tier.provider.capabilities.retry_timeouts:
                # The same work would run out of time again: move on, don't retry.
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
        call: Call,
        original: Any,
        finish: Finish,
    ) -> Any:
        """Try ranked tiers until ``call`` succeeds on one, then return what ``finish``
        makes of it; ``finish`` takes over the tier's in-flight count and hold."""
        ranked = self._ranked(req, self.candidates(req.model, key, task))
        trail = Trail()
        # The first ranked tier, when it is priced and may be called: its hold goes in
        # the admission call.
        first = ranked[0] if ranked else None
        if first is not None and (not first.priced or first.health.state == "open"):
            first = None
        first_outcome = None
        if first is not None or (key is not None and key.has_rate_limits):
            first_outcome = await self._admit(req, first, key, trail)
        for i, tier in enumerate(ranked):
            if not tier.provider.ready:
                trail.failures.append(f"{tier.name}: not ready")
                continue
            health = tier.health
            # A closed circuit (the usual case) allows without asking further.
            if health.opened_at is not None and not health.allow():
                trail.failures.append(f"{tier.name}: circuit open")
                continue
            outcome = None
            if tier.priced:
                outcome = await self._hold_for(req, tier, key, first_outcome, i == 0)
                if isinstance(outcome, Refusal):
                    trail.refusals.append(outcome)  # the ledger logged it
                    health.release_trial()
                    continue
            if task != "chat":
                tier_req = original
            else:
                tier_req = self._bounded(req, tier) if tier.priced else req
            health.in_flight += 1
            started = time.monotonic()
            try:
                try:  # _call_with_retries, written out: one frame less on the hot path
                    result = await self._try_once(tier, trail, deadline, call, tier_req)
                except RetryableError as failure:
                    result = await self._retry(failure, tier, trail, deadline, call, tier_req)
            except (RetryableError, CapacityError) as exc:
                health.in_flight -= 1
                self._tier_failed(tier, exc, trail)
                self._settle(tier, req, key, outcome, Usage(), trail, error=True)
                continue
            except BaseException:  # FatalError, cancellation: not the tier's fault
                health.in_flight -= 1
                health.release_trial()
                self._release(outcome)
                raise
            return finish(self, req, key, deadline, (tier, outcome, result, trail, ranked, i, started))
        raise self._exhausted(req, trail)

    def _tier_failed(self, tier: Tier, exc: ProviderError, trail: Trail) -> None:
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

    def _exhausted(self, req: ChatRequest, trail: Trail) -> RoutingError:
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

    # -- chat, embeddings, streams ----------------------------------------------------
    # Each returns the walk itself (not a coroutine awaiting it): every coroutine in the
    # chain is passed through each time the upstream call resumes.

    def chat(self, req: ChatRequest, key: ApiKey | None, deadline: float) -> Awaitable[Served[ChatResult]]:
        return self._walk(req, key, deadline, "chat", _chat_call, req, _whole_answer)

    def embed(
        self, req: EmbeddingRequest, key: ApiKey | None, deadline: float
    ) -> Awaitable[Served[EmbeddingResult]]:
        # Policies and holds see an embedding as a prompt with no output.
        as_chat = ChatRequest(
            model=req.model,
            messages=tuple({"role": "user", "content": text} for text in req.inputs),
            max_tokens=0,
            request_id=req.request_id,
        )
        return self._walk(as_chat, key, deadline, "embeddings", _embed_call, req, _whole_answer)

    def open_stream(
        self, req: ChatRequest, key: ApiKey | None, deadline: float
    ) -> Awaitable[ServedStream]:
        """Done once a tier produced its first meaningful chunk (failures before that
        are invisible); the rest of the stream is read from the returned object, which
        settles usage when it ends."""
        return self._walk(req, key, deadline, "chat", stream_call, req, _opened_stream)

    async def _open_on(self, tier: Tier, req: ChatRequest, deadline: float) -> OpenStream:
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
                    if meaningful(chunk):
                        break
        except TimeoutError as exc:
            await aclose_quietly(it)
            raise RetryableError(
                f"no first token within {self.routing.first_token_timeout_s:.1f}s", tier=tier.name
            ) from exc
        except BaseException:
            await aclose_quietly(it)
            raise
        return OpenStream(iterator=it, held=held, started=started, ttft_s=time.monotonic() - started)
