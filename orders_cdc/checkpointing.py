"""Checkpoint policy: where it is safe to checkpoint, and when it is due.

Safe = the last record before which every record is settled (done, skipped, a known
duplicate, stale, or durably dead-lettered). Due = after N settled records or T seconds, whichever first. The
position only moves forward.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from orders_cdc.kcl.protocol import Checkpointer, CheckpointError, KclError
from orders_cdc.pipeline import Outcome, RecordResult

log = logging.getLogger(__name__)

SETTLED = frozenset({Outcome.DONE, Outcome.SKIPPED, Outcome.DUPLICATE, Outcome.STALE, Outcome.DEAD_LETTERED})


def extended(sequence_number: str, sub_sequence_number: int) -> tuple[int, int]:
    return int(sequence_number), sub_sequence_number


@dataclass
class CheckpointPolicy:
    every_records: int = 1000
    every_seconds: float = 5.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    throttle_attempts: int = 5
    _pending: tuple[str, int] | None = None
    _committed: tuple[str, int] | None = None
    _since_commit: int = 0
    _last_commit_at: float = field(default=0.0)
    _blocked: bool = False  # a record is unsettled: nothing after it may be checkpointed
    stopped: bool = False  # shutdown / invalid state: this processor must not checkpoint again

    def __post_init__(self) -> None:
        self._last_commit_at = self.clock()

    @property
    def blocked(self) -> bool:
        """A record was not settled: no checkpoint may pass it, SHARD_END included."""
        return self._blocked

    @property
    def committed(self) -> tuple[str, int] | None:
        return self._committed

    def observe(self, results: Iterable[RecordResult]) -> None:
        for result in results:
            if self._blocked or result.outcome not in SETTLED:
                self._blocked = True
                return
            position = (result.sequence_number, result.sub_sequence_number)
            if self._pending is not None and extended(*position) <= extended(*self._pending):
                # Redelivered or out-of-order positions never move the checkpoint back.
                continue
            self._pending = position
            self._since_commit += 1

    def due(self) -> bool:
        if self._pending is None or self._pending == self._committed or self.stopped:
            return False
        return self._since_commit >= self.every_records or self.clock() - self._last_commit_at >= self.every_seconds

    def checkpoint(self, checkpointer: Checkpointer, force: bool = False) -> bool:
        """Checkpoint the safe position if due (or forced). True if it was written."""
        if self.stopped or not (force or self.due()) or self._pending in (None, self._committed):
            return False
        sequence, sub = self._pending
        for attempt in range(1, self.throttle_attempts + 1):
            try:
                checkpointer.checkpoint(sequence, sub)
            except CheckpointError as exc:
                if exc.error in (KclError.THROTTLING, KclError.DEPENDENCY) and attempt < self.throttle_attempts:
                    delay = random.uniform(0, min(10.0, 0.5 * 2**attempt))
                    log.warning("checkpoint failed, retrying", extra={"error": exc.error.value, "attempt": attempt, "delay_s": round(delay, 3)})
                    self.sleep(delay)
                    continue
                if exc.error in (KclError.SHUTDOWN, KclError.INVALID_STATE):
                    # The lease is gone or going: another worker resumes from the last
                    # committed checkpoint, so stop trying rather than fight over it.
                    log.warning("checkpointing stopped", extra={"error": exc.error.value})
                    self.stopped = True
                    return False
                log.error("checkpoint failed", extra={"error": str(exc), "sequence": sequence})
                return False
            self._committed = self._pending
            self._since_commit = 0
            self._last_commit_at = self.clock()
            return True
        return False
