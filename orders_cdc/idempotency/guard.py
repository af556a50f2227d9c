"""Wraps one call of a route's handler with the idempotency store, by the route's mode.

PER_CHANGE (lock, then react, then mark): one conditional PutItem per change takes an
INPROGRESS lock; only the changes locked go to the handler; the ones it did are marked
COMPLETED (BatchWriteItem), the ones it failed are released (deleted) for the retry.
  Exactly-once in effect, except: a crash (or a handler timeout) after the side effect
  and before the COMPLETED write -> the lock's lease runs out and the change is redone.
ATOMIC (compute, then commit with the markers): the handler gets every change not
already COMPLETED and returns their counter updates; the store commits each group of
changes' updates together with their markers in one transaction, conditional on the
markers being absent (see IdempotencyStore.commit). Exactly once, crashes, timeouts and
concurrent workers included: a marker found in the way makes that change a DUPLICATE.
OFF: the handler is called as is (at-least-once).

Markers are durable before `run` returns, so the checkpoint never passes a reaction whose
marker could still be lost; if they cannot be written the child exits (Fatal).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orders_cdc.change import ChangeRecord
from orders_cdc.errors import DeferredError, FatalProcessingError, HandlerTimeout, PermanentError, is_transient
from orders_cdc.idempotency.base import IdempotencyStore
from orders_cdc.idempotency.exceptions import IdempotencyAlreadyCompletedError
from orders_cdc.routing import Idempotency, Route

log = logging.getLogger(__name__)
T = TypeVar("T")

# The handler call: changes -> ({index in that list: exception}, what the handler returned);
# an index left out of the exceptions is done (ATOMIC: computed, to be committed).
Call = Callable[[Sequence[ChangeRecord]], tuple[dict[int, BaseException], Any]]


@dataclass
class CallResult:
    done: list[int] = field(default_factory=list)
    duplicate: list[int] = field(default_factory=list)
    failed: dict[int, BaseException] = field(default_factory=dict)


@dataclass
class IdempotencyGuard:
    store: IdempotencyStore | None
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    # Keys whose handler call timed out: the abandoned call may still be running, so the
    # lock is kept (not released) and the key not retried before its lease ends.
    _hung: dict[str, float] = field(default_factory=dict)

    def mode(self, route: Route) -> Idempotency:
        return route.idempotency if self.store is not None else Idempotency.OFF

    def completed(self, keys: Sequence[str]) -> set[str]:
        if self.store is None or not keys:
            return set()
        return durably("read idempotency records", lambda: self.store.completed(keys, self.clock()), self.sleep)

    def run(self, route: Route, changes: Sequence[ChangeRecord], keys: Sequence[str | None], call: Call) -> CallResult:
        mode = self.mode(route)
        if mode is Idempotency.OFF:
            return _plain(changes, call)
        if mode is Idempotency.ATOMIC:
            return self._atomic(changes, keys, call)
        result = CallResult()
        chosen = self._lock(keys, result)
        failures = call([changes[i] for i in chosen])[0] if chosen else {}
        done = [i for j, i in enumerate(chosen) if j not in failures]
        result.done = done
        for j, exc in failures.items():
            result.failed[chosen[j]] = exc
        durably("mark reactions done", lambda: self.store.save_success([keys[i] for i in done], self.clock()), self.sleep)
        self._release(keys, {chosen[j]: exc for j, exc in failures.items()})
        return result

    def _atomic(self, changes: Sequence[ChangeRecord], keys: Sequence[str | None], call: Call) -> CallResult:
        failures, output = call(changes)
        result = CallResult(failed=dict(failures))
        if len(failures) == len(changes):
            return result
        if not isinstance(output, Sequence) or len(output) != len(changes):
            bug = PermanentError(f"an ATOMIC handler must return one entry per change, got {type(output).__name__}")
            return CallResult(failed={i: failures.get(i, bug) for i in range(len(changes))})
        todo = []
        for i, updates in enumerate(output):
            if i in failures:
                continue
            if isinstance(updates, BaseException):
                result.failed[i] = updates
            else:
                todo.append(i)
        # Outside the handler's deadline, like the markers of PER_CHANGE routes: DynamoDB calls
        # bounded by the SDK's own timeouts. A commit that timed out but landed leaves its
        # markers, so the retry finds them: DUPLICATE, not counted twice.
        committed = self.store.commit([(keys[i], output[i]) for i in todo], self.clock())
        result.done = [todo[j] for j in committed.done]
        result.duplicate = [todo[j] for j in committed.duplicate]
        result.failed.update({todo[j]: exc for j, exc in committed.failed.items()})
        return result

    def _lock(self, keys: Sequence[str | None], result: CallResult) -> list[int]:
        locked = []
        for i, key in enumerate(keys):
            now = self.clock()
            if self._hung.get(key, 0.0) > now:
                result.failed[i] = DeferredError("an earlier call for this change timed out", until=self._hung[key])
                continue
            try:
                self.store.save_inprogress(key, now)
            except IdempotencyAlreadyCompletedError:
                result.duplicate.append(i)
            except FatalProcessingError:
                raise
            except Exception as exc:  # noqa: BLE001 - in progress elsewhere, or the store failed: per change
                result.failed[i] = exc
            else:
                self._hung.pop(key, None)
                locked.append(i)
        return locked

    def _release(self, keys: Sequence[str | None], failed: dict[int, BaseException]) -> None:
        now, release = self.clock(), []
        self._hung = {k: until for k, until in self._hung.items() if until > now}
        for i, exc in failed.items():
            if isinstance(exc, HandlerTimeout):
                self._hung[keys[i]] = now + self.store.lock_seconds
            else:
                release.append(keys[i])
        try:
            self.store.delete(release)
        except FatalProcessingError:
            raise
        except Exception as exc:  # noqa: BLE001 - the lease expires anyway, and we may re-take our own lock
            log.warning("could not release idempotency locks", extra={"locks": len(release), "error": repr(exc)})


def durably(what: str, fn: Callable[[], T], sleep: Callable[[float], None], attempts: int = 5) -> T:
    """fn(), retried on transient errors; FatalProcessingError if it still fails: without
    it the batch must not be acknowledged."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FatalProcessingError:
            raise
        except Exception as exc:  # noqa: BLE001
            if attempt == attempts or not is_transient(exc):
                raise FatalProcessingError(f"could not {what}: {exc!r}") from exc
            log.warning("store call failed, retrying", extra={"what": what, "attempt": attempt, "error": repr(exc)})
            sleep(min(5.0, 0.1 * 2**attempt))
    raise AssertionError("unreachable")


def _plain(changes: Sequence[ChangeRecord], call: Call) -> CallResult:
    failures, _ = call(changes)
    return CallResult(done=[i for i in range(len(changes)) if i not in failures], failed=dict(failures))
