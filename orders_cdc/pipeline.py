"""Batch -> outcomes: decode, route, run the handlers concurrently, retry, dead-letter.

Every record of a batch ends with exactly one outcome, and `process` returns only when
every record is settled (done, skipped, a duplicate, or durably dead-lettered); if it
cannot settle them within `batch_deadline_seconds` it raises FatalProcessingError and the
child exits unacknowledged: the daemon restarts the shard from the last checkpoint.

The unit of work is a *task*, one (route, record) pair. The batch is worked in *rounds*:
each round takes every task that is ready, cuts each route's into handler calls, and runs
all of the round's calls at once on the pool (bounded: `pool.capacity` calls in flight,
the rest wait in line). Within a route, one item's (order's) tasks are never in two calls
of a round, and a call gets them in stream order; a `per_change` route gets one change
per call, so one item's changes on it run one after the other, round by round.
- Idempotency (route.idempotency; see idempotency/guard.py): already-COMPLETED reactions
  are found with one BatchGetItem per 100 keys and become DUPLICATE without a call. The
  round's PER_CHANGE locks are taken together before its calls; done-markers are written
  25 at a time as the calls finish, the last ones before the round settles.
- Per-key fail-fast: a task that failed holds the later tasks of the same item on the
  same route (their order matters); other items go on.
- Each call has a deadline (a hung call is a retryable failure; see concurrency.py).
- A circuit breaker per route tells an outage from a bad record: while it is open the
  route is not called, records keep their attempts, and the batch waits (see breaker.py).
- What happens after a failure is `retry.decide`, a pure function of the failure.
- `request_stop` (the child's SIGTERM handler): no call starts any more, the calls in flight
  end and write their done-markers, and `process` returns with the records it could not
  settle as UNSETTLED, which the checkpoint never passes.

DynamoDB calls this layer adds (idempotency table), per record routed:
- every idempotent route: BatchGetItem, 1 per 100 (route, change) keys of the batch;
- PER_CHANGE: + TransactWriteItems 1 per 100 locks + BatchWriteItem 1 per 25 markers;
- ATOMIC: the markers ride in the route's own TransactWriteItems (100 items each, shared
  with the counter updates): no call of their own;
- OFF: nothing.
A redelivered batch costs only the reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from orders_cdc.breaker import BreakerPolicy, CircuitBreaker, State
from orders_cdc.change import ChangeRecord, DecodeError, decode_kcl_record
from orders_cdc.concurrency import Call, CallPool, Pool
from orders_cdc.deadletter import DeadLetter, DeadLetterSink
from orders_cdc.errors import (
    DeferredError, FatalProcessingError, PartialBatchFailure, PermanentError, describe, error_code, is_retryable,
)
from orders_cdc.idempotency.base import IdempotencyStore
from orders_cdc.idempotency.guard import CallResult, IdempotencyGuard
from orders_cdc.idempotency.keys import images_digest, item_id, reaction_key
from orders_cdc.logs import record_fields
from orders_cdc.metrics import RouteStats
from orders_cdc.outcomes import Outcome, RecordResult
from orders_cdc.retry import RetryPolicy, Verdict, decide
from orders_cdc.routing import Idempotency, Route, Router

__all__ = ["Outcome", "Pipeline", "Preview", "RecordResult"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Record:
    """One record of the batch and everything the pipeline knows of it."""

    index: int
    raw: dict
    change: ChangeRecord | None = None
    item: str = ""
    routed: dict[str, Outcome] | None = None  # None: no route matched; else route -> outcome so far
    letter: tuple[BaseException, int, list[str]] | None = None  # (why, attempts, routes) once dead-lettered
    _digest: str | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = images_digest(self.change)
        return self._digest

    @property
    def ident(self) -> str:
        return f"{self.raw.get('sequenceNumber')}/{self.raw.get('subSequenceNumber') or 0}"

    def dead_letter(self, exc: BaseException, attempts: int, route: str | None = None) -> None:
        _, before, routes = self.letter or (exc, 0, [])
        self.letter = (exc, max(before, attempts), routes + ([route] if route else []))
        if route and self.routed is not None:
            self.routed[route] = Outcome.DEAD_LETTERED


@dataclass(frozen=True, slots=True)
class Preview:
    """`Pipeline.preview` of one record: its event name (None: it does not decode), route ->
    already done, and why it would be dead-lettered."""

    event: str | None
    routes: dict[str, bool]
    error: str | None = None


@dataclass(eq=False)
class _Task:
    route: Route
    record: _Record
    key: str | None = None  # idempotency key
    attempts: int = 0
    held: bool = False  # failed or deferred: later tasks of the item wait for it
    not_before: float = 0.0
    first_failed_at: float | None = None

    @property
    def settled(self) -> bool:
        return self.route.name in (self.record.routed or {})

    def settle(self, outcome: Outcome) -> None:
        self.record.routed[self.route.name] = outcome  # type: ignore[index]


@dataclass(eq=False)
class _Unit:
    """One handler call of a round."""

    route: Route
    tasks: list[_Task]


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
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    pool: Pool = field(default_factory=CallPool)
    handler_timeout_seconds: float = 60.0
    batch_deadline_seconds: float = 240.0  # below the daemon's timeoutInSeconds (300)
    # Prefixes every idempotency key: a forced replay (`orders-cdc replay --force`) runs each
    # reaction again, once, under keys of its own.
    key_namespace: str = ""
    stats: RouteStats = field(default_factory=RouteStats)  # retries and call latencies, per route (metrics.py)
    _breakers: dict[str, CircuitBreaker] = field(default_factory=dict, init=False, repr=False)
    _guard: IdempotencyGuard = field(init=False, repr=False)
    _shard: str = field(default="", init=False, repr=False)
    _circuit_open: dict[str, bool] = field(default_factory=dict, init=False, repr=False)  # as last counted

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

    @property
    def stopping(self) -> bool:
        return self.pool.stopping

    def request_stop(self) -> None:
        """Start no more calls (safe in a signal handler: it takes no lock)."""
        self.pool.stopping = True

    def process(self, records: Sequence[dict], shard_id: str) -> list[RecordResult]:
        started = self.clock()
        self._shard = shard_id
        batch = [_Record(i, raw) for i, raw in enumerate(records)]
        pending = self._plan(self._decode_and_route(batch, shard_id))
        while pending and not self.stopping:
            self._round(pending, started)
        # Stopped: a record with a reaction not yet run is the next owner's, whole (a letter
        # for another of its routes is its to write).
        unsettled = {id(t.record) for tasks in pending.values() for t in tasks}
        dead = [r for r in batch if r.letter is not None and id(r) not in unsettled]
        if dead:
            self._send_dead_letters([self._letter(r, shard_id) for r in dead], dead)
        return [_result(r, id(r) in unsettled) for r in batch]

    def preview(self, records: Sequence[dict], shard_id: str) -> list[Preview]:
        """What `process` would do with the batch, with no side effect: decode, route, and
        look up (read only) which reactions are already done."""
        batch = [_Record(i, raw) for i, raw in enumerate(records)]
        pending = self._plan(self._decode_and_route(batch, shard_id))
        to_run = {id(t.record): set() for tasks in pending.values() for t in tasks}
        for route, tasks in pending.items():
            for task in tasks:
                to_run[id(task.record)].add(route.name)
        return [Preview(r.change.event.value if r.change else None,
                        dict.fromkeys(r.routed or {}, True) | dict.fromkeys(to_run.get(id(r), ()), False),
                        _reason(r.letter[0]) if r.letter else None)
                for r in batch]

    # -- planning -------------------------------------------------------------------------

    def _decode_and_route(self, batch: list[_Record], shard_id: str) -> dict[Route, list[_Record]]:
        work: dict[Route, list[_Record]] = {}
        for record in batch:
            try:
                change = record.change = decode_kcl_record(record.raw, shard_id)
                # Routing reads only the attributes its predicates name (images are lazy), so a
                # change that matches nothing is never fully decoded, and a corrupt image can
                # first show up here.
                matched = self.router.match(change)
                if matched:
                    # The handlers will read the whole images: decode them now, while the parsed
                    # document is still in the CPU cache, and dead-letter a corrupt one before
                    # any route acts on half a record.
                    change.validate()
                    record.item = item_id(change)
                    if any(self._guard.mode(r) is not Idempotency.OFF for r in matched):
                        record.digest  # noqa: B018 - here, where a failure dead-letters this record alone
            except Exception as exc:  # noqa: BLE001 - whatever one record does, it cannot end the child
                record.dead_letter(exc if isinstance(exc, DecodeError) else _Unplannable(exc), attempts=1)
                continue
            if matched:
                record.routed = {}
            for route in matched:
                work.setdefault(route, []).append(record)
        return work

    def _plan(self, work: dict[Route, list[_Record]]) -> dict[Route, list[_Task]]:
        pending: dict[Route, list[_Task]] = {}
        for route, records in work.items():
            idempotent = self._guard.mode(route) is not Idempotency.OFF
            seen: set[str] = set()
            tasks = pending[route] = []
            for record in records:
                task = _Task(route, record)
                if idempotent:
                    task.key = self.key_namespace + reaction_key(route.name, record.change, record.digest)
                    if task.key in seen:  # the same change twice in one batch
                        task.settle(Outcome.DUPLICATE)
                        continue
                    seen.add(task.key)
                tasks.append(task)
        every = [t for tasks in pending.values() for t in tasks]
        done = self._guard.completed([t.key for t in every if t.key])
        for task in (t for t in every if t.key in done):
            task.settle(Outcome.DUPLICATE)
        return {route: left for route, tasks in pending.items() if (left := [t for t in tasks if t.key not in done])}

    # -- one round ------------------------------------------------------------------------

    def _round(self, pending: dict[Route, list[_Task]], started: float) -> None:
        """Run every call that is ready, all at once; if none was, sleep until one will be."""
        now = self.clock()
        deadline = started + self.batch_deadline_seconds
        if now >= deadline:
            left = {t.record.index for tasks in pending.values() for t in tasks}
            raise FatalProcessingError(
                f"{len(left)} record(s) unsettled after {self.batch_deadline_seconds:.0f}s"
                f" (routes: {', '.join(sorted(r.name for r in pending))})"
            )
        units, wakes = [], []
        for route, tasks in pending.items():
            breaker = self.breaker_for(route)
            allowance = breaker.allowance()
            if allowance == 0:
                wakes.append(breaker.ready_at)
                continue
            ready, wake = _ready(tasks, now)
            if wake is not None:
                wakes.append(wake)
            units += _units(route, ready[:1] if allowance == 1 else ready)
        if not units:
            # In steps of at most a second, so that a stop request is seen while waiting.
            self.sleep(min(1.0, max(0.0, min(wakes + [deadline]) - now)))
            return
        failed = self._lock(units)
        units = [u for u in units if u.tasks]
        # ATOMIC routes' commits run one after the other, in one call: concurrent transactions
        # on the same counter items (two inventory routes, one day's metrics) would cancel
        # each other (TransactionConflict).
        atomic = [u for u in units if self._guard.mode(u.route) is Idempotency.ATOMIC]
        units = [u for u in units if u not in atomic] + atomic
        calls = [self._call_of(u) for u in units[: len(units) - len(atomic)]]
        if atomic:
            fns = [self._call_of(u).fn for u in atomic]
            calls.append(Call(lambda: [_outcome(fn) for fn in fns]))
        results = self.pool.run(calls, self.handler_timeout_seconds, deadline - now)
        if atomic:
            last = results.pop()
            results += last if isinstance(last, list) else [last] * len(atomic)
        outcomes = [(unit, self._result_of(unit, result)) for unit, result in zip(units, results)]
        self._finish(outcomes)
        for task, exc in failed:
            self._failed(task, exc)
        for unit, result in outcomes:
            self._settle(unit, result)
        for route in list(pending):
            pending[route] = [t for t in pending[route] if not t.settled]
            if not pending[route]:
                del pending[route]
        self._count_circuits()

    def _count_circuits(self) -> None:
        """Count each circuit's opening and closing once (metrics); half-open counts as open."""
        for name, breaker in self._breakers.items():
            is_open = breaker.state is not State.CLOSED
            if is_open != self._circuit_open.get(name, False):
                self._circuit_open[name] = is_open
                self.stats.circuit(name, opened=is_open)

    def _lock(self, units: list[_Unit]) -> list[tuple[_Task, BaseException]]:
        """Take the PER_CHANGE locks of the round in one go; drops from each unit the tasks
        that are duplicates (settled) or could not be locked (returned, to be decided)."""
        per_change = [t for u in units if self._guard.mode(u.route) is Idempotency.PER_CHANGE for t in u.tasks]
        if not per_change:
            return []
        locked, duplicate, refused = self._guard.lock([t.key for t in per_change])
        failed = []
        for task in per_change:
            if task.key in duplicate:
                task.settle(Outcome.DUPLICATE)
            elif task.key in refused:
                failed.append((task, refused[task.key]))
        for unit in units:
            if self._guard.mode(unit.route) is Idempotency.PER_CHANGE:
                unit.tasks = [t for t in unit.tasks if t.key in locked]
        return failed

    def _call_of(self, unit: _Unit) -> Call:
        changes = [t.record.change for t in unit.tasks]
        route = unit.route
        if self._guard.mode(route) is Idempotency.ATOMIC:
            keys = [t.key for t in unit.tasks]
            return Call(self._timed(route, lambda: self._guard.atomic(changes, keys,
                                                                      lambda cs: call_handler(route, cs, self.ctx))))

        per_change = self._guard.mode(route) is Idempotency.PER_CHANGE
        keys = [t.key for t in unit.tasks]

        def run() -> CallResult:
            failures, _ = call_handler(route, changes, self.ctx)
            done = [j for j in range(len(changes)) if j not in failures]
            if per_change:
                self._guard.done([keys[j] for j in done])
            return CallResult(done=done, failed=failures)

        return Call(self._timed(route, run), (lambda _: self._guard.late()) if per_change else None)

    def _timed(self, route: Route, fn: Callable[[], Any]) -> Callable[[], Any]:
        """fn, its duration recorded as the route's handler latency (an ATOMIC route's with its commit)."""
        def timed() -> Any:
            started = time.perf_counter()
            try:
                return fn()
            finally:
                self.stats.call(route.name, (time.perf_counter() - started) * 1000)
        return timed

    def _result_of(self, unit: _Unit, result: Any) -> CallResult:
        if isinstance(result, FatalProcessingError):
            raise result
        if isinstance(result, BaseException):  # the call itself failed: a timeout, not started, a bug
            return CallResult(failed={j: result for j in range(len(unit.tasks))})
        return result

    def _finish(self, outcomes: list[tuple[_Unit, CallResult]]) -> None:
        """The round's last PER_CHANGE markers (durable before anything settles) and releases."""
        failed, per_change = {}, False
        for unit, result in outcomes:
            if self._guard.mode(unit.route) is Idempotency.PER_CHANGE:
                per_change = True
                failed.update({unit.tasks[j].key: exc for j, exc in result.failed.items()})
        if per_change:
            self._guard.finish(failed)

    def _settle(self, unit: _Unit, result: CallResult) -> None:
        route, tasks = unit.route, unit.tasks
        breaker = self.breaker_for(route)
        breaker.record(
            len(result.done),
            [tasks[j].record.ident for j, exc in result.failed.items()
             if is_retryable(exc) and not isinstance(exc, DeferredError)],
        )
        for j in result.done:
            tasks[j].settle(Outcome.DONE)
        for j in result.duplicate:
            tasks[j].settle(Outcome.DUPLICATE)
        for j, exc in result.failed.items():
            self._failed(tasks[j], exc)

    def _failed(self, task: _Task, exc: BaseException) -> None:
        if isinstance(exc, FatalProcessingError):
            raise exc
        now = self.clock()
        breaker = self.breaker_for(task.route)
        task.held = True
        if task.first_failed_at is None and not isinstance(exc, DeferredError):
            task.first_failed_at = now
        decision = decide(
            self.retry, exc, attempts=task.attempts, now=now,
            age=now - task.record.change.created_at.timestamp(),
            circuit_closed=breaker.state is State.CLOSED, probe_at=breaker.ready_at,
            worked_since_first_failure=breaker.succeeded_since(task.first_failed_at or now),
        )
        task.attempts = decision.attempts
        if decision.verdict in (Verdict.RETRY, Verdict.HOLD, Verdict.TRIP):
            self.stats.retried(task.route.name)
        # One line per failed change: which record, order and route, and what happens next
        # (retry, wait, hold, trip, dead_letter). A wait is not a failure (a lock held
        # elsewhere, the SES rate): DEBUG.
        log.log(logging.DEBUG if decision.verdict is Verdict.WAIT else logging.WARNING, "change failed",
                extra=record_fields(task.record.change, self._shard, task.record.raw, task.route.name,
                                    decision.verdict.value)
                | {"error": describe(exc), "attempts": decision.attempts, "circuit": breaker.state.value})
        if decision.verdict is Verdict.DEAD_LETTER:
            task.record.dead_letter(exc, decision.attempts, task.route.name)
            return
        if decision.verdict is Verdict.TRIP:
            if breaker.state is not State.OPEN:  # once per round, not once per change refused
                breaker.trip(f"{error_code(exc) or type(exc).__name__}: route not working (record {task.record.ident})")
            task.not_before = breaker.ready_at
            return
        task.not_before = decision.at

    # -- dead letters -----------------------------------------------------------------------

    def _letter(self, record: _Record, shard_id: str) -> DeadLetter:
        exc, attempts, routes = record.letter  # type: ignore[misc]
        return DeadLetter(
            record=record.raw,
            shard_id=shard_id,
            sequence_number=record.raw.get("sequenceNumber", ""),
            sub_sequence_number=int(record.raw.get("subSequenceNumber") or 0),
            reason=_reason(exc),
            error_type=type(exc).__name__,
            attempts=attempts,
            failed_routes=tuple(routes),
            dead_lettered_at=datetime.now(timezone.utc).isoformat(),
        )

    def _send_dead_letters(self, letters: list[DeadLetter], records: list[_Record]) -> None:
        for attempt in range(1, self.dead_letter_attempts + 1):
            try:
                self.dead_letters.send(letters)
            except Exception as exc:  # noqa: BLE001
                log.error("dead-letter write failed", extra={"attempt": attempt, "error": describe(exc)})
                if attempt == self.dead_letter_attempts:
                    raise FatalProcessingError(
                        f"{len(letters)} record(s) could not be dead-lettered: {describe(exc)}"
                    ) from exc
                self.sleep(self.retry.backoff(attempt))
            else:
                for letter, record in zip(letters, records):
                    log.error(
                        "record dead-lettered",
                        extra=record_fields(record.change, letter.shard_id, record.raw,
                                            ",".join(letter.failed_routes) or None, Outcome.DEAD_LETTERED.value)
                        | {"reason": letter.reason, "attempts": letter.attempts, "routes": list(letter.failed_routes)},
                    )
                return


def call_handler(route: Route, changes: Sequence[ChangeRecord], ctx: Any) -> tuple[dict[int, BaseException], Any]:
    """Call the route's handler: ({index: why} for the changes it failed, its output).

    A `per_change` route's handler is called once per change, in order; what each call
    returned is the output (per change), an exception fails that change only, and the later
    changes of its item are held back (they must not overtake it)."""
    if route.per_change:
        failures: dict[int, BaseException] = {}
        outputs: list[Any] = []
        failed_items: set[str] = set()
        for j, change in enumerate(changes):
            item = item_id(change)
            try:
                if item in failed_items:
                    raise DeferredError("held: an earlier change of this item failed")
                outputs.append(route.handler(change, ctx))
            except FatalProcessingError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried or dead-lettered
                failures[j] = exc
                outputs.append(None)
                failed_items.add(item)
        return failures, outputs
    try:
        return {}, route.handler(changes, ctx)
    except PartialBatchFailure as partial:
        return dict(partial.failures), None
    except FatalProcessingError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is retried or dead-lettered
        return {j: exc for j in range(len(changes))}, None


def _ready(tasks: list[_Task], now: float) -> tuple[list[_Task], float | None]:
    """The tasks that may run now (stream order): not waiting out a backoff, and not behind
    an earlier task of the same item that failed and is still unsettled."""
    ready, blocked, wake = [], set(), None
    for task in tasks:
        item = task.record.item
        if item in blocked:
            continue
        if task.held:
            blocked.add(item)
        if task.not_before <= now:
            ready.append(task)
        else:
            wake = task.not_before if wake is None else min(wake, task.not_before)
    return ready, wake


def _units(route: Route, ready: list[_Task]) -> list[_Unit]:
    """A route's handler calls for one round: an item's tasks all in one call (in stream
    order), at most `max_batch` tasks a call; a per_change route's item gets one task a
    round. An ATOMIC route makes one call (its commits are sequential)."""
    if not ready:
        return []
    if route.idempotency is Idempotency.ATOMIC and not route.max_batch:
        return [_Unit(route, ready)]
    size = route.max_batch or (1 if route.per_change else len(ready))
    by_item: dict[str, list[_Task]] = {}
    for task in ready:
        by_item.setdefault(task.record.item, []).append(task)
    units, current = [], []
    for tasks in by_item.values():
        tasks = tasks[:size]  # the rest of a very busy item waits for the next round
        if current and len(current) + len(tasks) > size:
            units.append(_Unit(route, current))
            current = []
        current += tasks
    if current:
        units.append(_Unit(route, current))
    if route.idempotency is Idempotency.ATOMIC:
        return units[:1]  # one commit sequence at a time; the rest go next round
    return units


def _result(record: _Record, unsettled: bool = False) -> RecordResult:
    seq, sub = record.raw["sequenceNumber"], int(record.raw.get("subSequenceNumber") or 0)
    routes = tuple(sorted((record.routed or {}).items()))
    if unsettled:
        return RecordResult(seq, sub, Outcome.UNSETTLED, record.change, "the worker was asked to stop", routes)
    if record.letter is not None:
        return RecordResult(seq, sub, Outcome.DEAD_LETTERED, record.change, _reason(record.letter[0]), routes)
    outcomes = {o for _, o in routes}
    if not outcomes:
        return RecordResult(seq, sub, Outcome.SKIPPED, record.change)
    for outcome in (Outcome.DONE, Outcome.STALE, Outcome.DUPLICATE):
        if outcome in outcomes:
            return RecordResult(seq, sub, outcome, record.change, None, routes)
    raise AssertionError(f"record {record.index} has no settled outcome: {routes}")


class _Unplannable(PermanentError):
    """A record that decoded but could not be routed or keyed (a predicate or the
    idempotency digest failed on it): dead-lettered at once, with what went wrong."""

    def __init__(self, exc: BaseException):
        super().__init__(f"cannot be planned: {type(exc).__name__}: {exc}")


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - handed back as the call's result
        return exc


def _reason(exc: BaseException) -> str:
    return describe(exc)
