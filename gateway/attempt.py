"""One try of one tier for one request: the ``Attempt``, and the ``Walk`` it belongs to.

An attempt checks the tier is ready and its circuit allows a call, holds the worst case
of a priced tier's call in the budget (and caps its output, so the hold is a bound),
counts the call in flight, makes it with retries (tenacity) inside the request's
deadline, and afterwards settles the usage with the ledger or gives the hold back. The
router's walk (``gateway.router``) and a stream's resume (``gateway.streaming``) both
go through it; neither touches holds, health or the ledger itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from gateway.config import RoutingConfig
from gateway.routing import Tier, estimate_prompt_tokens
from gateway.tasks import BackgroundTasks
from providers.errors import CapacityError, ProviderError, RetryableError
from providers.schemas import ChatRequest, Usage
from tracking import ApiKey, Hold, HoldRequest, PriceTable, Refusal, UsageEvent, UsageLedger

log = structlog.get_logger(__name__)

# What an attempt calls: ``call(attempt, payload)`` gives the awaitable of one try (a
# provider's chat or embed, or opening a stream). A plain function, not a closure, so
# nothing is built per request to make the call.
Call = Callable[["Attempt", Any], Awaitable[Any]]
Outcome = Literal["ok", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class Services:
    """What every attempt of one generation uses: its routing settings, the ledger, its
    prices, and the process's background tasks (ledger calls nobody waits for)."""

    routing: RoutingConfig
    ledger: UsageLedger
    prices: PriceTable
    background: BackgroundTasks


class Walk:
    """One request's way over the tiers: the request, its caller and deadline, and what
    happened on the way (for the error message, the headers and the log)."""

    __slots__ = ("services", "req", "key", "deadline", "attempts", "failures", "refusals",
                 "admitted_tokens")

    def __init__(self, services: Services, req: ChatRequest, key: ApiKey | None, deadline: float) -> None:
        self.services = services
        self.req = req
        self.key = key
        self.deadline = deadline
        self.attempts = 0
        self.failures: list[str] = []
        self.refusals: list[Refusal] = []
        # Tokens the admission charged to the key's tokens-per-minute; the first settle
        # corrects the charge to the actual tokens.
        self.admitted_tokens: int | None = None

    def hold_request(self, tier: Tier, req: ChatRequest) -> HoldRequest:
        """The worst case of ``req`` on ``tier``, to hold before calling it."""
        max_output = req.max_tokens if req.max_tokens is not None else tier.cfg.max_output_tokens
        amount = self.services.prices.worst_case_micros(
            tier.name, tier.cfg.model, estimate_prompt_tokens(req), max_output * max(req.n, 1)
        )
        key = self.key
        return HoldRequest(tier=tier.name, model=req.model, key=key.name if key else None,
                           amount_micros=amount)


class Attempt:
    """One try of ``tier`` for ``req`` (the walk's request, or a resumed stream's).

    In order: ``available()``, ``hold_budget()`` for a priced tier, ``call()``; then,
    once the answer is complete (or the stream ends), ``finish()``. ``call`` records a
    tier failure itself and gives the hold back when the call ends without a verdict.
    """

    __slots__ = ("walk", "tier", "req", "hold", "started")

    def __init__(self, walk: Walk, tier: Tier, req: ChatRequest) -> None:
        self.walk = walk
        self.tier = tier
        self.req = req
        self.hold: Hold | None = None
        self.started = 0.0  # when the call began (monotonic)

    # -- before the call ---------------------------------------------------------------

    def available(self) -> bool:
        """Ready, and the circuit lets a call through (half-open: one trial); a tier that
        is not is noted in the walk."""
        tier = self.tier
        if not tier.provider.ready:
            self.walk.failures.append(f"{tier.name}: not ready")
            return False
        health = tier.health
        # A closed circuit (the usual case) allows without asking further.
        if health.opened_at is not None and not health.allow():
            self.walk.failures.append(f"{tier.name}: circuit open")
            return False
        return True

    async def hold_budget(self, admitted: Hold | Refusal | None = None) -> bool:
        """Hold the worst case of a priced tier's call; ``admitted`` is the outcome of
        the walk's admission when it already asked for this tier. False when the budget
        refused (noted in the walk)."""
        outcome = admitted
        if outcome is None:
            outcome = await self.walk.services.ledger.reserve(self.walk.hold_request(self.tier, self.req))
        if isinstance(outcome, Refusal):
            self.walk.refusals.append(outcome)  # the ledger logged it
            self.tier.health.release_trial()
            return False
        self.hold = outcome
        return True

    def capped(self, req: ChatRequest) -> ChatRequest:
        """``req`` as this tier gets it: a priced tier never runs without an output cap,
        as its hold assumed one."""
        if req.max_tokens is not None or not self.tier.priced:
            return req
        cap = self.tier.cfg.max_output_tokens
        body = dict(req.body)
        body["max_tokens"] = cap
        return req.replace(max_tokens=cap, body=body)

    # -- the call ----------------------------------------------------------------------

    async def call(self, call: Call, payload: Any) -> Any:
        """``call(self, payload)``, retried while retryable and time remains; counted in
        flight until ``finish``. A tier failure (retries spent, or a capacity error) is
        recorded and raised; a client error or a cancellation gives the hold back and is
        raised."""
        health = self.tier.health
        health.in_flight += 1
        self.started = time.monotonic()
        try:
            # Fast path: docs/BENCHMARKS.md "first try outside tenacity".
            try:
                return await self._try_once(call, payload)
            except RetryableError as failure:
                return await self._retry(failure, call, payload)
        except (RetryableError, CapacityError) as exc:
            self.failed(exc)
            self.finish(Usage(), "failed")
            raise
        except BaseException:  # FatalError, cancellation: not the tier's fault
            health.in_flight -= 1
            health.release_trial()
            self.give_back()
            raise

    async def _retry(self, failure: RetryableError, call: Call, payload: Any) -> Any:
        """The tries after a first retryable ``failure``, as tenacity decides: the
        failure is tenacity's first attempt, so every decision after it is tenacity's."""
        first_failure: RetryableError | None = failure
        async for attempt in retrying(self.walk.services.routing, self.walk.deadline):
            with attempt:
                if first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
                return await self._try_once(call, payload)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _try_once(self, call: Call, payload: Any) -> Awaitable[Any]:
        """One try: the awaitable of ``call``, under a timer unless the tier's own
        timeout ends it before the deadline."""
        tier = self.tier
        remaining = self.walk.deadline - time.monotonic()
        if remaining <= 0:
            raise RetryableError("request deadline passed", tier=tier.name)
        self.walk.attempts += 1
        timeout = tier.cfg.timeout_s
        # Fast path: docs/BENCHMARKS.md "no router timer for a self-timed tier".
        if tier.self_timed and timeout <= remaining:
            return call(self, payload)
        return self._timed(min(timeout, remaining), call(self, payload))

    async def _timed(self, timeout: float, pending: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await pending
        except TimeoutError as exc:
            if not self.tier.retry_timeouts:
                # The same work would run out of time again: move on, don't retry.
                raise CapacityError(f"timed out after {timeout:.1f}s", tier=self.tier.name) from exc
            raise RetryableError(f"timed out after {timeout:.1f}s", tier=self.tier.name) from exc

    # -- after the call ----------------------------------------------------------------

    def failed(self, exc: ProviderError) -> None:
        """The tier failed this request (before an answer, or a stream mid-way): noted in
        the walk and the tier's health."""
        tier = self.tier
        self.walk.failures.append(f"{tier.name}: {exc.message}")
        opened = tier.health.record_failure(exc.message)
        log.warning("tier_failed", tier=tier.name, error=type(exc).__name__, reason=exc.message,
                    status=exc.status, circuit_opened=opened)

    def finish(self, usage: Usage, outcome: Outcome, *, ttft_s: float | None = None,
               tpot_s: float | None = None) -> None:
        """The call's part is over: out of flight, the outcome in the tier's health
        ("ok" with its latencies; "failed" after ``failed``; "cancelled": the client
        left), and ``usage`` settled with the ledger against the hold."""
        tier, walk = self.tier, self.walk
        health = tier.health
        health.in_flight -= 1
        if outcome == "ok":
            health.record_success(ttft_s=ttft_s, tpot_s=tpot_s)
        elif outcome == "cancelled":
            health.release_trial()
        services = walk.services
        cost = 0
        if tier.priced:
            cost = services.prices.cost_micros(
                tier.name, tier.cfg.model, usage.prompt_tokens, usage.completion_tokens
            )
        # The admission's token estimate is corrected by the walk's first settle.
        admitted, walk.admitted_tokens = walk.admitted_tokens, None
        key = walk.key
        event = UsageEvent(
            tier=tier.name, model=self.req.model, key=key.name if key else None,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cost_micros=cost, error=outcome == "failed", admitted_tokens=admitted,
        )
        hold, self.hold = self.hold, None
        if hold is not None and hold.budgets:
            # Money is held in Redis: settle it now, in one round trip.
            services.background.spawn(services.ledger.commit(hold, event), name="ledger_commit")
        else:
            # Fast path: docs/BENCHMARKS.md "batched usage" (no task, no round trip here).
            services.ledger.record(event)

    def give_back(self, hold: Hold | None = None) -> None:
        """Return ``hold`` (by default this attempt's own) to the budget unspent."""
        if hold is None:
            hold, self.hold = self.hold, None
        if hold is not None:
            ledger = self.walk.services.ledger
            self.walk.services.background.spawn(ledger.release(hold), name="ledger_release")


def retrying(routing: RoutingConfig, deadline: float) -> AsyncRetrying:
    """Tenacity's retry loop for one tier: ``routing.retries`` more tries with
    exponential backoff (or the upstream's Retry-After), never past ``deadline``."""
    backoff = wait_exponential(
        multiplier=routing.backoff_initial_s, max=routing.backoff_max_s,
        exp_base=routing.backoff_multiplier,
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
            exc.retry_after is None or exc.retry_after <= routing.max_retry_after_s
        )

    return AsyncRetrying(
        stop=stop_after_attempt(routing.retries + 1) | stop_at_deadline,
        wait=wait,
        retry=retry_if_exception(retryable),
        reraise=True,
    )
