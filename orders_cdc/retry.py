"""Retry policy (bounded attempts, a maximum record age, exponential backoff with full
jitter) and the deadline of one attempt."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from orders_cdc.errors import FatalProcessingError, HandlerTimeout, is_retryable

log = logging.getLogger(__name__)


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


def run_inline(fn: Callable[[], None], timeout: float) -> None:
    """No deadline: for tests whose handlers cannot hang."""
    fn()


@dataclass
class ThreadRunner:
    """Runs each handler call in a daemon thread and waits at most `timeout` seconds.

    A call that overruns raises HandlerTimeout here (a retryable failure) so one hung
    downstream call never stalls the shard past the daemon's timeoutInSeconds. Python
    cannot kill a thread: the abandoned one keeps running and may still complete its side
    effect, which is why a timeout is at-least-once. Daemon threads never block the
    child's exit; past `max_abandoned` live ones the child is treated as wedged and
    exits (FatalProcessingError) so the daemon starts a clean one.
    """

    max_abandoned: int = 8
    _abandoned: list[threading.Thread] = field(default_factory=list)

    def __call__(self, fn: Callable[[], None], timeout: float) -> None:
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        if len(self._abandoned) >= self.max_abandoned:
            raise FatalProcessingError(f"{len(self._abandoned)} handler calls are still hung")
        outcome: list[BaseException | None] = []

        def target() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                outcome.append(exc)
            else:
                outcome.append(None)

        thread = threading.Thread(target=target, name="handler", daemon=True)
        thread.start()
        thread.join(max(0.0, timeout))
        if not outcome:
            self._abandoned.append(thread)
            log.error("handler call timed out", extra={"timeout_s": round(timeout, 3), "hung": len(self._abandoned)})
            raise HandlerTimeout(f"handler did not return within {timeout:.1f}s")
        if outcome[0] is not None:
            raise outcome[0]
