"""Per-tier health as the router sees it: a circuit breaker, latency EWMAs and the
in-flight count. The router records outcomes here; policies read ``TierView``s made
from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

CircuitState = Literal["closed", "open", "half_open"]


@dataclass
class TierHealth:
    """Mutable, owned by one router; only touched from the event loop."""

    failures_to_open: int = 5
    reset_after_s: float = 30.0
    alpha: float = 0.2  # EWMA weight of the newest sample
    clock: Callable[[], float] = time.monotonic

    consecutive_failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False
    ttft_ewma_s: float | None = None
    tpot_ewma_s: float | None = None
    in_flight: int = 0
    successes: int = 0
    failures: int = 0
    last_error: str = field(default="")

    @property
    def state(self) -> CircuitState:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.reset_after_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a request go to this tier now? Half-open lets one trial through."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def record_success(self, ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """A call succeeded: the circuit closes, the latency averages take the sample."""
        self.successes += 1
        self.consecutive_failures = 0
        if self.opened_at is not None or self.trial_in_flight:
            self.opened_at = None
            self.trial_in_flight = False
        alpha = self.alpha
        if ttft_s is not None:
            old = self.ttft_ewma_s
            self.ttft_ewma_s = ttft_s if old is None else old + alpha * (ttft_s - old)
        if tpot_s is not None:
            old = self.tpot_ewma_s
            self.tpot_ewma_s = tpot_s if old is None else old + alpha * (tpot_s - old)

    def record_failure(self, reason: str) -> bool:
        """Count a tier failure; return True when this failure opened the circuit."""
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = reason
        was_open = self.opened_at is not None
        if self.trial_in_flight or self.consecutive_failures >= self.failures_to_open:
            self.opened_at = self.clock()
            self.trial_in_flight = False
            return not was_open
        return False

    def release_trial(self) -> None:
        """A half-open trial ended without a verdict (client error, cancellation)."""
        self.trial_in_flight = False
