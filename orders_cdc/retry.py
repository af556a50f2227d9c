"""Retry policy (bounded attempts, a maximum record age, exponential backoff with full
jitter), and `decide`: what happens next to a change whose reaction failed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from orders_cdc.errors import DeferredError, Failure, classify, is_retryable, is_transient

MIN_WAIT = 0.01  # never spin on a clock that has not moved


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base_seconds: float = 0.2
    max_seconds: float = 5.0
    max_record_age_seconds: float = 0.0  # 0: no limit

    def should_retry(self, attempts: int, exc: BaseException, record_age_seconds: float = 0.0) -> bool:
        """attempts = how many times the record has been tried, including the failed one."""
        if not is_retryable(exc) or attempts >= self.max_attempts:
            return False
        return not (self.max_record_age_seconds and record_age_seconds > self.max_record_age_seconds)

    def backoff(self, attempts: int, rand: random.Random | None = None) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2^(n-1))]."""
        ceiling = min(self.max_seconds, self.base_seconds * (2 ** max(0, attempts - 1)))
        return (rand or random).uniform(0, ceiling)


class Verdict(StrEnum):
    RETRY = "retry"  # try again at `at`; one attempt spent
    WAIT = "wait"  # held elsewhere or back-pressure (DeferredError): again at `at`, no attempt spent
    HOLD = "hold"  # the route is down (its circuit is not closed): again at the probe, no attempt spent
    TRIP = "trip"  # a refusal, or out of attempts on an outage's errors while the route has not worked: open the circuit, hold
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    attempts: int  # the change's attempts after this failure
    at: float = 0.0  # RETRY / WAIT / HOLD: not before this (epoch seconds)


def decide(policy: RetryPolicy, exc: BaseException, *, attempts: int, now: float, age: float,
           circuit_closed: bool, probe_at: float, worked_since_first_failure: bool,
           rand: random.Random | None = None) -> Decision:
    """What happens next to one change after `exc`, given how often it was tried, how old
    it is and what its route's circuit breaker knows. Pure: the caller applies it."""
    kind = classify(exc)
    if kind is Failure.DEFERRED:
        until = exc.until if isinstance(exc, DeferredError) and exc.until is not None else now + policy.backoff(1, rand)
        return Decision(Verdict.WAIT, attempts, max(until, now + MIN_WAIT))
    if kind is Failure.PERMANENT:
        return Decision(Verdict.DEAD_LETTER, max(1, attempts + 1))
    if kind is Failure.REFUSED:
        # The account, a permission or a resource: no record is at fault and none can fix
        # it. Hold the route and probe it; never dead-letter.
        return Decision(Verdict.TRIP, attempts)
    if not circuit_closed:
        # This call opened the circuit, or was a failed probe: an outage, not this record.
        return Decision(Verdict.HOLD, attempts, probe_at)
    attempts += 1
    if policy.should_retry(attempts, exc, age):
        return Decision(Verdict.RETRY, attempts, now + policy.backoff(attempts, rand))
    too_old = bool(policy.max_record_age_seconds) and age > policy.max_record_age_seconds
    if is_transient(exc) and not too_old and not worked_since_first_failure:
        # No evidence that the record is at fault: hold it and probe the route.
        return Decision(Verdict.TRIP, attempts)
    return Decision(Verdict.DEAD_LETTER, attempts)
