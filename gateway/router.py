"""The router: the tiers that may serve a request, in the policy's order, walked one
``Attempt`` at a time until one serves.

- Retryable errors are retried with backoff inside the request deadline (the attempt),
  then the next tier is tried. Capacity errors fail over at once. Fatal (client) errors
  go back to the client at once.
- A priced tier is only called under a budget hold; a refused hold skips the tier. The
  key's rate limits and the first priced tier's hold are one ledger round trip.
- A stream is "opened" when its first meaningful chunk arrived: every failure before
  that is invisible to the client (``gateway.streaming`` reads it on from there).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.attempt import Attempt, Call, Services, Walk
from gateway.config import RoutingConfig
from gateway.routing import RoutingError, Served, Tier, estimate_prompt_tokens
from gateway.streaming import ServedStream, open_stream
from gateway.tasks import BackgroundTasks
from policies.base import Policy
from providers.errors import CapacityError, RetryableError
from providers.schemas import ChatRequest, ChatResult, EmbeddingRequest, EmbeddingResult
from tracking import ApiKey, Hold, PriceTable, Refusal, UsageLedger

__all__ = ["Router", "Walked"]

# Client-chosen model names seen per generation, at most (each keeps its tiers' order).
MAX_ROUTED_MODELS = 1024


class Walked:
    """A walk that found its tier: the attempt that served, its result, and the ranked
    tiers with the serving tier's place among them (a stream resumes after it)."""

    __slots__ = ("attempt", "result", "ranked", "place")

    def __init__(self, attempt: Attempt, result: Any, ranked: list[Tier], place: int) -> None:
        self.attempt = attempt
        self.result = result
        self.ranked = ranked
        self.place = place

    @property
    def remaining(self) -> list[Tier]:
        return self.ranked[self.place + 1 :]


# What a walk that found its tier becomes, per kind of request; it takes over the
# attempt (its in-flight count and hold).
Finish = Callable[[Walk, Walked], Any]


def _chat(attempt: Attempt, req: ChatRequest) -> Awaitable[ChatResult]:
    return attempt.tier.provider.chat(attempt.capped(req))


def _embed(attempt: Attempt, req: EmbeddingRequest) -> Awaitable[EmbeddingResult]:
    return attempt.tier.provider.embed(req)


def _whole_answer(walk: Walk, walked: Walked) -> Served[Any]:
    attempt, result = walked.attempt, walked.result
    attempt.finish(result.usage, "ok", ttft_s=time.monotonic() - attempt.started)
    return Served(result=result, tier=attempt.tier.name, attempts=walk.attempts)


def _opened_stream(walk: Walk, walked: Walked) -> ServedStream:
    return ServedStream(walk, walked.attempt, walked.result, remaining=walked.remaining)


class Router:
    """One generation's router: its tiers, its policy, and what attempts use."""

    def __init__(
        self,
        *,
        tiers: Sequence[Tier],
        policy: Policy,
        routing: RoutingConfig,
        ledger: UsageLedger,
        prices: PriceTable,
        background: BackgroundTasks,
    ) -> None:
        self.tiers = {t.name: t for t in tiers}
        self.policy = policy
        self.services = Services(routing=routing, ledger=ledger, prices=prices, background=background)
        self._static_order = bool(getattr(policy, "static_order", False))
        # (task, public model name) -> (the tiers that answer it in file order, and the
        # same ranked once when the policy's order is static).
        self._routes: dict[tuple[str, str], tuple[list[Tier], list[Tier] | None]] = {}

    # -- choosing -------------------------------------------------------------------

    def public_models(self, task: str = "chat") -> list[str]:
        names: list[str] = []
        for t in self.tiers.values():
            if t.cfg.task == task:
                public = [m for m in t.cfg.public_models if m != "auto"] or [t.cfg.model]
                names.extend(m for m in public if m not in names)
        return names

    def ranked(self, req: ChatRequest, key: ApiKey | None, task: str = "chat") -> list[Tier]:
        """The tiers to try for ``req`` from this caller, in order; 404 when no tier
        serves the model, 403 when the key may use none of them."""
        route = self._routes.get((task, req.model))
        if route is None:
            route = self._route(req, task)
        answering, ranked = route
        if not answering:
            raise RoutingError(
                f"The model `{req.model}` does not exist or is not served here.",
                status=404,
                code="model_not_found",
            )
        if key is not None:
            if not key.may_use_model(req.model):
                raise RoutingError(
                    f"This API key may not use the model `{req.model}`.",
                    status=403,
                    code="model_not_allowed",
                    type_="permission_error",
                )
            answering = [t for t in answering if key.may_use_tier(t.name)]
            if not answering:
                raise RoutingError(
                    f"This API key may not use any tier that serves `{req.model}`.",
                    status=403,
                    code="tier_not_allowed",
                    type_="permission_error",
                )
            if ranked is not None:
                ranked = [t for t in ranked if key.may_use_tier(t.name)]
        if ranked is None:
            return self._rank(req, answering)
        return ranked

    def _route(self, req: ChatRequest, task: str) -> tuple[list[Tier], list[Tier] | None]:
        answering = [t for t in self.tiers.values() if t.cfg.task == task and t.cfg.answers(req.model)]
        # Fast path: docs/BENCHMARKS.md "static policy order, tiers per model cached".
        ranked = self._rank(req, answering) if self._static_order else None
        route = (answering, ranked)
        if len(self._routes) < MAX_ROUTED_MODELS:  # names are the client's: bound the cache
            self._routes[(task, req.model)] = route
        return route

    def _rank(self, req: ChatRequest, tiers: list[Tier]) -> list[Tier]:
        if not tiers:
            return tiers
        order = self.policy.rank(req, [t.view() for t in tiers])
        return [self.tiers[n] for n in order if n in self.tiers]

    # -- the walk ---------------------------------------------------------------------

    async def _admit(self, walk: Walk, first: Tier | None) -> Hold | Refusal | None:
        """Rate limits and the first priced tier's hold, in one ledger round trip."""
        req, key = walk.req, walk.key
        hold_req = walk.hold_request(first, req) if first is not None else None
        tokens = estimate_prompt_tokens(req) + (req.max_tokens or 0)
        admission = await self.services.ledger.admit(key=key, tokens=tokens, hold=hold_req)
        if key is not None and key.tpm is not None:
            walk.admitted_tokens = tokens
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

    async def _walk(
        self, req: ChatRequest, key: ApiKey | None, deadline: float, task: str, call: Call,
        payload: Any, finish: Finish,
    ) -> Any:
        """Try the ranked tiers until ``call`` succeeds on one, then return what
        ``finish`` makes of it."""
        ranked = self.ranked(req, key, task)
        walk = Walk(self.services, req, key, deadline)
        # The first ranked tier, when it is priced and may be called: its hold goes in
        # the admission call.
        first = ranked[0] if ranked else None
        if first is not None and (not first.priced or first.health.state == "open"):
            first = None
        admitted = None
        if first is not None or (key is not None and key.has_rate_limits):
            admitted = await self._admit(walk, first)
        for place, tier in enumerate(ranked):
            attempt = Attempt(walk, tier, req)
            if not attempt.available():
                if place == 0 and isinstance(admitted, Hold):
                    attempt.give_back(admitted)  # held at admission for a tier not called
                continue
            if tier.priced and not await attempt.hold_budget(admitted if place == 0 else None):
                continue
            try:
                result = await attempt.call(call, payload)
            except (RetryableError, CapacityError):
                continue  # recorded by the attempt
            return finish(walk, Walked(attempt, result, ranked, place))
        raise self._exhausted(walk)

    def _exhausted(self, walk: Walk) -> RoutingError:
        if walk.refusals and not walk.failures:
            r = walk.refusals[0]
            return RoutingError(
                f"Budget exhausted: {r.message}",
                status=429,
                code="budget_exceeded",
                type_="insufficient_quota",
                attempts=walk.attempts,
            )
        parts = walk.failures + [f"{r.scope}: {r.message}" for r in walk.refusals]
        return RoutingError(
            "No tier could serve this request: " + "; ".join(parts or ["no tier available"]),
            status=503,
            code="no_tier_available",
            type_="server_error",
            attempts=walk.attempts,
        )

    # -- chat, embeddings, streams ----------------------------------------------------
    # Fast path: docs/BENCHMARKS.md "the walk returned, not awaited".
    # Each returns the walk itself (not a coroutine awaiting it): every coroutine in the
    # chain is passed through each time the upstream call resumes.

    def chat(self, req: ChatRequest, key: ApiKey | None, deadline: float) -> Awaitable[Served[ChatResult]]:
        return self._walk(req, key, deadline, "chat", _chat, req, _whole_answer)

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
        return self._walk(as_chat, key, deadline, "embeddings", _embed, req, _whole_answer)

    def open_stream(
        self, req: ChatRequest, key: ApiKey | None, deadline: float
    ) -> Awaitable[ServedStream]:
        """Done once a tier produced its first meaningful chunk (failures before that
        are invisible); the rest of the stream is read from the returned object, which
        settles usage when it ends."""
        return self._walk(req, key, deadline, "chat", open_stream, req, _opened_stream)
