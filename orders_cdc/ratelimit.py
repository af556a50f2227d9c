"""A token bucket: a sending rate that is a quota of the account (SES), not an error.

`take` waits for a token, at most `max_wait` seconds; it never sleeps past that, and says
how long the caller would have had to wait, so the caller can hand the change back to the
pipeline (DeferredError: no attempt spent) instead of holding a call slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class TokenBucket:
    rate: float  # tokens per second
    burst: float = 1.0  # bucket size: the most sent at once after an idle spell
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _tokens: float = field(default=-1.0, init=False)
    _at: float = field(default=0.0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate!r}")
        self.burst = max(1.0, self.burst)
        self._tokens, self._at = self.burst, self.clock()

    def take(self, max_wait: float = 1.0) -> float:
        """Take one token, waiting up to `max_wait` seconds for it. Returns 0.0 when taken,
        else how long from now one would be free (nothing was taken)."""
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            wait = (1.0 - self._tokens) / self.rate if self._tokens < 1.0 else 0.0
            if wait > max_wait:
                return wait
            # Reserved now, so concurrent callers queue behind it in order.
            self._tokens -= 1.0
        if wait > 0:
            self.sleep(wait)
        return 0.0
