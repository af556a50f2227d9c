"""A circuit breaker per route: tell an outage from a bad record.

Failures of *different* records in a row mean the downstream is failing, not the records:
the breaker opens and the pipeline stops calling the route (it keeps the batch and sleeps),
then lets one change through as a probe (half-open). A success closes it; a failed probe
opens it again for twice as long, up to a maximum. One record failing again and again
never trips it by count: its attempts run out and it is dead-lettered, unless the route
has not succeeded since that record first failed (see `succeeded_since`).

Failures while the breaker is open or probing do not spend records' attempts: an outage
must not turn into a dead-letter queue full of good records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

log = logging.getLogger(__name__)


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    threshold: int = 5  # distinct records failing in a row (retryable) that open the circuit
    open_seconds: float = 1.0  # the first open period; doubled by each failed probe
    max_open_seconds: float = 30.0


@dataclass
class CircuitBreaker:
    name: str
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    clock: Callable[[], float] = time.time
    state: State = State.CLOSED
    ready_at: float = 0.0  # when an open circuit lets a probe through
    last_success_at: float = float("-inf")
    _streak: set[str] = field(default_factory=set)
    _opened: int = 0  # consecutive openings: the backoff exponent

    def allowance(self) -> int | None:
        """How many changes may be tried now: None = all, 1 = a probe, 0 = none."""
        if self.state is State.OPEN and self.clock() >= self.ready_at:
            self.state = State.HALF_OPEN
            log.info("circuit half-open: probing", extra={"route": self.name})
        return {State.CLOSED: None, State.HALF_OPEN: 1, State.OPEN: 0}[self.state]

    def record(self, successes: int, failed: Iterable[str]) -> None:
        """One call's result: how many changes succeeded and which records (ids) failed
        retryably. Permanent failures and deferrals are neither: leave them out."""
        failed = set(failed)
        if successes:
            self.last_success_at = self.clock()
            if self.state is not State.CLOSED:
                log.info("circuit closed: the route works again", extra={"route": self.name})
            self.state, self._opened = State.CLOSED, 0
            self._streak = set(failed)
        elif failed and self.state is State.HALF_OPEN:
            self.trip("probe failed")
            return
        else:
            self._streak |= failed
        if self.state is State.CLOSED and len(self._streak) >= self.policy.threshold:
            self.trip(f"{len(self._streak)} records failed in a row")

    def trip(self, why: str) -> None:
        delay = min(self.policy.max_open_seconds, self.policy.open_seconds * 2**self._opened)
        self._opened += 1
        self.state, self.ready_at, self._streak = State.OPEN, self.clock() + delay, set()
        log.warning("circuit open", extra={"route": self.name, "why": why, "probe_in_s": delay})

    def succeeded_since(self, moment: float) -> bool:
        """Has the route worked since `moment`? If not, a record failing with an outage's
        errors is not proof that the record is bad."""
        return self.last_success_at >= moment
