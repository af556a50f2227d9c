"""Retry policy: bounded attempts, a maximum record age, exponential backoff with full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass

from orders_cdc.errors import is_retryable


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
