"""Batch -> outcomes: decode, route, run handlers, retry, dead-letter. Pure of the daemon.

Every record of a batch ends with exactly one outcome. Only DONE, SKIPPED and
DEAD_LETTERED are settled; the checkpoint policy never moves past anything else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from orders_cdc.change import ChangeRecord, DecodeError, decode_kcl_record
from orders_cdc.deadletter import DeadLetter, DeadLetterSink
from orders_cdc.errors import FatalProcessingError, PartialBatchFailure
from orders_cdc.retry import RetryPolicy
from orders_cdc.routing import Route, Router

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # no route matched
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True, slots=True)
class RecordResult:
    sequence_number: str
    sub_sequence_number: int
    outcome: Outcome
    change: ChangeRecord | None = None
    reason: str | None = None


@dataclass
class Pipeline:
    router: Router
    ctx: Any
    dead_letters: DeadLetterSink
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time
    dead_letter_attempts: int = 5

    def process(self, records: Sequence[dict], shard_id: str) -> list[RecordResult]:
        changes: list[ChangeRecord | None] = [None] * len(records)
        letters: dict[int, DeadLetter] = {}
        for i, record in enumerate(records):
            try:
                changes[i] = decode_kcl_record(record, shard_id)
            except DecodeError as exc:
                letters[i] = self._letter(record, shard_id, exc, attempts=1)

        work: dict[Route, list[int]] = {}
        routed: set[int] = set()
        for i, change in enumerate(changes):
            if change is None:
                continue
            try:
                # Images are decoded lazily, so a corrupt image can first show up here.
                matched = self.router.match(change)
            except DecodeError as exc:
                letters[i] = self._letter(records[i], shard_id, exc, attempts=1)
                continue
            for route in matched:
                work.setdefault(route, []).append(i)
                routed.add(i)

        attempts = 1
        while work:
            failures: dict[int, tuple[BaseException, list[str]]] = {}
            for route, indices in work.items():
                for i, exc in self._call(route, indices, changes).items():
                    failures.setdefault(i, (exc, []))[1].append(route.name)
            work = self._retry_or_dead_letter(work, failures, attempts, records, changes, shard_id, letters)
            if work:
                delay = self.retry.backoff(attempts)
                log.warning(
                    "retrying failed changes",
                    extra={"shard": shard_id, "records": len({i for v in work.values() for i in v}), "attempt": attempts, "delay_s": round(delay, 3)},
                )
                self.sleep(delay)
                attempts += 1

        if letters:
            self._send_dead_letters(list(letters.values()))

        results = []
        for i, record in enumerate(records):
            seq, sub = record["sequenceNumber"], int(record.get("subSequenceNumber") or 0)
            if i in letters:
                results.append(RecordResult(seq, sub, Outcome.DEAD_LETTERED, changes[i], letters[i].reason))
            elif i in routed:
                results.append(RecordResult(seq, sub, Outcome.DONE, changes[i]))
            else:
                results.append(RecordResult(seq, sub, Outcome.SKIPPED, changes[i]))
        return results

    def _call(self, route: Route, indices: list[int], changes) -> dict[int, BaseException]:
        batch = [changes[i] for i in indices]
        try:
            route.handler(batch, self.ctx)
        except PartialBatchFailure as partial:
            return {indices[j]: exc for j, exc in partial.failures.items()}
        except Exception as exc:  # noqa: BLE001 - every failure is retried or dead-lettered below
            log.warning("handler failed", extra={"route": route.name, "changes": len(batch), "error": repr(exc)})
            return {i: exc for i in indices}
        return {}

    def _retry_or_dead_letter(self, work, failures, attempts, records, changes, shard_id, letters):
        """Keep only the (route, record) pairs that failed and may still succeed."""
        give_up = set()
        for i, (exc, route_names) in failures.items():
            age = self.clock() - changes[i].created_at.timestamp()
            if not self.retry.should_retry(attempts, exc, age):
                give_up.add(i)
                letters[i] = self._letter(records[i], shard_id, exc, attempts, tuple(route_names))
        next_work: dict[Route, list[int]] = {}
        for route, indices in work.items():
            again = [i for i in indices if i in failures and i not in give_up and route.name in failures[i][1]]
            if again:
                next_work[route] = again
        return next_work

    def _letter(self, record, shard_id, exc, attempts, routes=()) -> DeadLetter:
        return DeadLetter(
            record=record,
            shard_id=shard_id,
            sequence_number=record.get("sequenceNumber", ""),
            sub_sequence_number=int(record.get("subSequenceNumber") or 0),
            reason=str(exc) or type(exc).__name__,
            error_type=type(exc).__name__,
            attempts=attempts,
            failed_routes=routes,
            dead_lettered_at=datetime.now(timezone.utc).isoformat(),
        )

    def _send_dead_letters(self, letters: list[DeadLetter]) -> None:
        for attempt in range(1, self.dead_letter_attempts + 1):
            try:
                self.dead_letters.send(letters)
            except Exception as exc:  # noqa: BLE001
                log.error("dead-letter write failed", extra={"attempt": attempt, "error": repr(exc)})
                if attempt == self.dead_letter_attempts:
                    raise FatalProcessingError(
                        f"{len(letters)} record(s) could not be dead-lettered: {exc!r}"
                    ) from exc
                self.sleep(self.retry.backoff(attempt))
            else:
                for letter in letters:
                    log.error(
                        "record dead-lettered",
                        extra={"shard": letter.shard_id, "sequence": letter.sequence_number, "reason": letter.reason, "attempts": letter.attempts},
                    )
                return
