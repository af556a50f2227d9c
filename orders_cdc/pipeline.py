"""Batch -> outcomes: decode, route, run handlers once per change, retry, dead-letter.

Every record of a batch ends with exactly one outcome, and `process` returns only when
every record is settled (done, skipped, a duplicate, stale, or durably dead-lettered); if
it cannot settle them within `batch_deadline_seconds` it raises FatalProcessingError and
the child exits unacknowledged: the daemon restarts the shard from the last checkpoint.

The unit of work is a *task*, one (route, record) pair:
- Idempotency (route.idempotency; see idempotency/guard.py): already-COMPLETED reactions
  are found with one BatchGetItem per 100 keys and become DUPLICATE without a call.
- Ordering (route.ordered): a task runs only if its change is newer than the item's
  high-water mark (else STALE or DUPLICATE), one change per item per handler call.
- Per-key fail-fast: a task that failed holds the later tasks of the same item on the
  same route (their order matters); other items go on.
- Each handler call has a deadline (a hung call is a retryable failure).
- A circuit breaker per route tells an outage from a bad record: while it is open the
  route is not called, records keep their attempts, and the batch waits (see breaker.py).

DynamoDB calls this layer adds (idempotency table), per record routed:
- every idempotent route: BatchGetItem, 1 per 100 (route, change) keys of the batch;
- PER_CHANGE: + 1 conditional PutItem (the lock) + BatchWriteItem 1 per 25 (markers);
- ATOMIC: the markers ride in the route's own TransactWriteItems (100 items each, shared
  with the counter updates): no call of their own;
- OFF: nothing; ordered: + BatchGetItem 1 per 100 items, + 1 UpdateItem per item per batch.
A redelivered batch costs only the reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from orders_cdc.breaker import BreakerPolicy, CircuitBreaker, State
from orders_cdc.change import ChangeRecord, DecodeError, decode_kcl_record
from orders_cdc.deadletter import DeadLetter, DeadLetterSink
from orders_cdc.errors import DeferredError, FatalProcessingError, PartialBatchFailure, is_retryable, is_transient
from orders_cdc.idempotency.base import IdempotencyStore
from orders_cdc.idempotency.guard import IdempotencyGuard, durably
from orders_cdc.idempotency.keys import images_digest, item_id, reaction_key
from orders_cdc.ordering import HighWaterMarkStore, Verdict, compare, mark_key, version
from orders_cdc.retry import RetryPolicy, ThreadRunner
from orders_cdc.routing import Idempotency, Route, Router

log = logging.getLogger(__name__)
_MIN_WAIT = 0.01


class Outcome(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # no route matched
    DUPLICATE = "duplicate"  # every reaction was done before (redelivery, KDS duplicate, replay)
    STALE = "stale"  # older than what an ordered route already applied
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True, slots=True)
class RecordResult:
    sequence_number: str
    sub_sequence_number: int
    outcome: Outcome
    change: ChangeRecord | None = None
    reason: str | None = None
    routes: tuple[tuple[str, Outcome], ...] = ()  # per route, for the record's routed changes


@dataclass(eq=False)
class _Task:
    route: Route
    index: int
    item: str
    key: str | None = None  # idempotency key
    mark: str | None = None  # high-water-mark key (ordered routes)
    version: str = ""
    attempts: int = 0
    held: bool = False  # failed or deferred: later tasks of the item wait for it
    not_before: float = 0.0
    first_failed_at: float | None = None


@dataclass
class _Batch:
    records: Sequence[dict]
    shard_id: str
    changes: list[ChangeRecord | None]
    started: float
    letters: dict[int, tuple[BaseException, int, list[str]]] = field(default_factory=dict)
    routed: dict[int, dict[str, Outcome]] = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)
    marks: dict[str, str] = field(default_factory=dict)  # high-water marks: stored, then applied here
    advanced: dict[str, str] = field(default_factory=dict)  # marks to write before returning

    def digest(self, i: int) -> str:
        if i not in self.digests:
            self.digests[i] = images_digest(self.changes[i])
        return self.digests[i]

    def settle(self, task: _Task, outcome: Outcome) -> None:
        self.routed[task.index][task.route.name] = outcome

    def dead_letter(self, i: int, exc: BaseException, attempts: int, route: str | None = None) -> None:
        _, before, routes = self.letters.get(i, (exc, 0, []))
        self.letters[i] = (exc, max(before, attempts), routes + ([route] if route else []))
        if route:
            self.routed[i][route] = Outcome.DEAD_LETTERED


@dataclass
class Pipeline:
    router: Router
    ctx: Any
    dead_letters: DeadLetterSink
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time  # epoch seconds: record ages, deadlines, leases
    dead_letter_attempts: int = 5
    idempotency: IdempotencyStore | None = None  # None: every route is at-least-once
    high_water_marks: HighWaterMarkStore | None = None  # None: ordered routes order within a batch only
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    runner: Callable[[Callable[[], None], float], None] = field(default_factory=ThreadRunner)
    handler_timeout_seconds: float = 60.0
    batch_deadline_seconds: float = 240.0  # below the daemon's timeoutInSeconds (300)
    lock_call_size: int = 25  # PER_CHANGE routes: changes per handler call (= one BatchWriteItem of markers)
    _breakers: dict[str, CircuitBreaker] = field(default_factory=dict, init=False, repr=False)
    _guard: IdempotencyGuard = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._guard = IdempotencyGuard(self.idempotency, self.clock, self.sleep)
        atomic = [r.name for r in self.router.routes if r.idempotency is Idempotency.ATOMIC]
        if atomic and self.idempotency is None:
            # Their handlers write nothing themselves: without a store nothing would be applied.
            raise ValueError(f"ATOMIC routes need an idempotency store: {', '.join(atomic)}")

    def breaker_for(self, route: Route) -> CircuitBreaker:
        # Kept across batches: an open circuit stays open for the next batch too.
        if route.name not in self._breakers:
            self._breakers[route.name] = CircuitBreaker(route.name, self.breaker, self.clock)
        return self._breakers[route.name]

    def process(self, records: Sequence[dict], shard_id: str) -> list[RecordResult]:
        batch = _Batch(records, shard_id, [None] * len(records), self.clock())
        work = self._decode_and_route(batch)
        pending = self._plan(work, batch)
        while pending:
            self._round(pending, batch)
        if batch.advanced and self.high_water_marks is not None:
            # Before the checkpoint can pass these changes: a lost mark would let an older
            # change through later.
            durably("advance high-water marks", lambda: self.high_water_marks.advance_many(batch.advanced, self.clock()),
                    self.sleep)
        if batch.letters:
            self._send_dead_letters([self._letter(batch, i, *v) for i, v in sorted(batch.letters.items())])
        return [self._result(batch, i) for i in range(len(records))]

    # -- planning -------------------------------------------------------------------------

    def _decode_and_route(self, batch: _Batch) -> dict[Route, list[int]]:
        work: dict[Route, list[int]] = {}
        for i, record in enumerate(batch.records):
            try:
                change = batch.changes[i] = decode_kcl_record(record, batch.shard_id)
                # Routing reads only the attributes its predicates name (images are lazy), so a
                # change that matches nothing is never fully decoded, and a corrupt image can
                # first show up here.
                matched = self.router.match(change)
                if matched:
                    # The handlers will read the whole images: decode them now, while the parsed
                    # document is still in the CPU cache (B2: 15.6 against 25.3 µs per record on
                    # first access after the whole batch is routed), and dead-letter a corrupt one
                    # before any route acts on half a record.
                    change.validate()
            except DecodeError as exc:
                batch.dead_letter(i, exc, attempts=1)
                continue
            if matched:
                batch.routed[i] = {}
            for route in matched:
                work.setdefault(route, []).append(i)
        return work

    def _plan(self, work: dict[Route, list[int]], batch: _Batch) -> dict[Route, list[_Task]]:
        pending: dict[Route, list[_Task]] = {}
        for route, indices in work.items():
            idempotent = self._guard.mode(route) is not Idempotency.OFF
            seen: set[str] = set()
            tasks = pending[route] = []
            for i in indices:
                change = batch.changes[i]
                task = _Task(route, i, item_id(change))
                if idempotent:
                    task.key = reaction_key(route.name, change, batch.digest(i))
                    if task.key in seen:  # the same change twice in one batch
                        batch.settle(task, Outcome.DUPLICATE)
                        continue
                    seen.add(task.key)
                if route.ordered:
                    task.mark, task.version = mark_key(route.name, change), version(change, batch.digest(i))
                tasks.append(task)
        every = [t for tasks in pending.values() for t in tasks]
        done = self._guard.completed([t.key for t in every if t.key])
        marks = [t.mark for t in every if t.mark]
        if marks and self.high_water_marks is not None:
            batch.marks = durably("read high-water marks", lambda: self.high_water_marks.get_many(marks), self.sleep)
        for task in (t for t in every if t.key in done):
            batch.settle(task, Outcome.DUPLICATE)
        return {route: left for route, tasks in pending.items() if (left := [t for t in tasks if t.key not in done])}

    # -- the retry loop -------------------------------------------------------------------

    def _round(self, pending: dict[Route, list[_Task]], batch: _Batch) -> None:
        """Call every route that has tasks ready; if none had, sleep until one will."""
        now = self.clock()
        if now - batch.started >= self.batch_deadline_seconds:
            left = {t.index for tasks in pending.values() for t in tasks}
            raise FatalProcessingError(
                f"{len(left)} record(s) unsettled after {self.batch_deadline_seconds:.0f}s"
                f" (routes: {', '.join(sorted(r.name for r in pending))})"
            )
        wakes, called = [], False
        for route in list(pending):
            breaker = self.breaker_for(route)
            allowance = breaker.allowance()
            if allowance == 0:
                wakes.append(breaker.ready_at)
                continue
            ready, wake = self._ready(route, pending[route], batch, now)
            if wake is not None:
                wakes.append(wake)
            if allowance == 1:
                ready = ready[:1]
            size = self.lock_call_size if self._guard.mode(route) is Idempotency.PER_CHANGE else len(ready) or 1
            for start in range(0, len(ready), size):
                called = True
                self._attempt(route, ready[start : start + size], batch)
                if breaker.state is not State.CLOSED:
                    break  # it just opened: stop calling a route that is down
            pending[route] = [t for t in pending[route] if t.route.name not in batch.routed.get(t.index, {})]
            if not pending[route]:
                del pending[route]
        if pending and not called:
            until = min(wakes + [batch.started + self.batch_deadline_seconds])
            self.sleep(max(0.0, until - now))

    def _ready(self, route: Route, tasks: list[_Task], batch: _Batch, now: float) -> tuple[list[_Task], float | None]:
        ready, blocked, wake = [], set(), None
        for task in tasks:
            if task.item in blocked:
                continue
            if route.ordered:
                verdict = compare(task.version, batch.marks.get(task.mark))
                if verdict is not Verdict.NEWER:
                    batch.settle(task, Outcome(verdict.value))  # dropped from `tasks` by the caller
                    continue
                blocked.add(task.item)  # one change per item per call, oldest first
            elif task.held:
                blocked.add(task.item)
            if task.not_before <= now:
                ready.append(task)
            else:
                wake = task.not_before if wake is None else min(wake, task.not_before)
        return ready, wake

    def _attempt(self, route: Route, tasks: list[_Task], batch: _Batch) -> None:
        remaining = batch.started + self.batch_deadline_seconds - self.clock()
        timeout = max(0.0, min(self.handler_timeout_seconds, remaining))
        changes = [batch.changes[t.index] for t in tasks]
        result = self._guard.run(route, changes, [t.key for t in tasks], lambda cs: self._call(route, cs, timeout))
        breaker = self.breaker_for(route)
        breaker.record(
            len(result.done),
            [_record_id(batch, tasks[j].index) for j, exc in result.failed.items()
             if is_retryable(exc) and not isinstance(exc, DeferredError)],
        )
        for j in result.done:
            batch.settle(tasks[j], Outcome.DONE)
            if route.ordered:
                batch.marks[tasks[j].mark] = batch.advanced[tasks[j].mark] = tasks[j].version
        for j in result.duplicate:
            batch.settle(tasks[j], Outcome.DUPLICATE)
        for j, exc in result.failed.items():
            self._failed(tasks[j], exc, breaker, batch)
        if result.failed:
            first = next(iter(result.failed.values()))
            log.warning("changes failed", extra={"shard": batch.shard_id, "route": route.name, "failed": len(result.failed),
                                                 "of": len(tasks), "error": repr(first), "circuit": breaker.state.value})

    def _call(self, route: Route, changes: Sequence[ChangeRecord], timeout: float) -> tuple[dict[int, BaseException], Any]:
        output: list[Any] = [None]

        def invoke() -> None:
            output[0] = route.handler(changes, self.ctx)

        try:
            self.runner(invoke, timeout)
        except PartialBatchFailure as partial:
            return dict(partial.failures), None
        except FatalProcessingError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is retried or dead-lettered
            return {i: exc for i in range(len(changes))}, None
        return {}, output[0]

    def _failed(self, task: _Task, exc: BaseException, breaker: CircuitBreaker, batch: _Batch) -> None:
        now = self.clock()
        task.held = True
        if isinstance(exc, FatalProcessingError):
            raise exc
        if isinstance(exc, DeferredError):  # held elsewhere: wait, spend no attempt
            until = exc.until if exc.until is not None else now + self.retry.backoff(1)
            task.not_before = max(until, now + _MIN_WAIT)  # never spin on a clock that has not moved
            return
        task.first_failed_at = task.first_failed_at if task.first_failed_at is not None else now
        if not is_retryable(exc):
            batch.dead_letter(task.index, exc, max(1, task.attempts + 1), task.route.name)
            return
        if breaker.state is not State.CLOSED:
            # This call opened the circuit, or was a failed probe: an outage, not this record.
            task.not_before = breaker.ready_at
            return
        task.attempts += 1
        age = now - batch.changes[task.index].created_at.timestamp()
        if self.retry.should_retry(task.attempts, exc, age):
            task.not_before = now + self.retry.backoff(task.attempts)
            return
        too_old = self.retry.max_record_age_seconds and age > self.retry.max_record_age_seconds
        if is_transient(exc) and not too_old and not breaker.succeeded_since(task.first_failed_at):
            # Attempts used up on outage-type errors while the route has not worked once
            # since: no evidence that the record is at fault. Hold it and probe.
            breaker.trip(f"record {_record_id(batch, task.index)} out of attempts, route not working")
            task.not_before = breaker.ready_at
            return
        batch.dead_letter(task.index, exc, task.attempts, task.route.name)

    # -- results and dead letters -----------------------------------------------------------

    def _result(self, batch: _Batch, i: int) -> RecordResult:
        record = batch.records[i]
        seq, sub = record["sequenceNumber"], int(record.get("subSequenceNumber") or 0)
        routes = tuple(sorted(batch.routed.get(i, {}).items()))
        if i in batch.letters:
            return RecordResult(seq, sub, Outcome.DEAD_LETTERED, batch.changes[i], _reason(batch.letters[i][0]), routes)
        outcomes = {o for _, o in routes}
        if not outcomes:
            return RecordResult(seq, sub, Outcome.SKIPPED, batch.changes[i])
        for outcome in (Outcome.DONE, Outcome.STALE, Outcome.DUPLICATE):
            if outcome in outcomes:
                return RecordResult(seq, sub, outcome, batch.changes[i], None, routes)
        raise AssertionError(f"record {i} has no settled outcome: {routes}")

    def _letter(self, batch: _Batch, i: int, exc: BaseException, attempts: int, routes: list[str]) -> DeadLetter:
        record = batch.records[i]
        return DeadLetter(
            record=record,
            shard_id=batch.shard_id,
            sequence_number=record.get("sequenceNumber", ""),
            sub_sequence_number=int(record.get("subSequenceNumber") or 0),
            reason=_reason(exc),
            error_type=type(exc).__name__,
            attempts=attempts,
            failed_routes=tuple(routes),
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
                        extra={"shard": letter.shard_id, "sequence": letter.sequence_number, "reason": letter.reason,
                               "attempts": letter.attempts, "routes": list(letter.failed_routes)},
                    )
                return


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _record_id(batch: _Batch, i: int) -> str:
    record = batch.records[i]
    return f"{record.get('sequenceNumber')}/{record.get('subSequenceNumber') or 0}"
