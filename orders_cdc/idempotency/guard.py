"""The idempotency store around a route's handler calls, by the route's mode.

PER_CHANGE (lock, then react, then mark), in steps the pipeline takes once per round for
every such route together, so that the store calls are batched across the batch: `lock`
takes an INPROGRESS lock per change (TransactWriteItems, 100 conditional puts a call); the
handler calls run on the changes locked; `finish` marks the ones done COMPLETED
(BatchWriteItem, 25 a call) and releases the ones that failed, for the retry.
  Exactly-once in effect, except: a crash (or a handler timeout) after the side effect
  and before the COMPLETED write -> the lock's lease runs out and the change is redone. A
  call that timed out keeps its locks, and marks what it did if it finishes late (`late`).
ATOMIC (compute, then commit with the markers, `atomic`): the handler gets every change
not already COMPLETED and returns their counter updates; the store commits each group of
changes' updates together with their markers in one transaction, conditional on the
markers being absent (see IdempotencyStore.commit). Exactly once, crashes, timeouts and
concurrent workers included: a marker found in the way makes that change a DUPLICATE.
OFF: the handler is called as is (at-least-once).

Markers are durable before the round settles, so the checkpoint never passes a reaction
whose marker could still be lost; if they cannot be written the child exits (Fatal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from orders_cdc.change import ChangeRecord
from orders_cdc.errors import DeferredError, FatalProcessingError, HandlerTimeout, PermanentError, describe, is_transient
from orders_cdc.idempotency.base import IdempotencyStore
from orders_cdc.idempotency.exceptions import IdempotencyAlreadyCompletedError
from orders_cdc.routing import Idempotency, Route

log = logging.getLogger(__name__)
T = TypeVar("T")
MARKERS_PER_CALL = 25  # BatchWriteItem

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
    # Done-markers not yet written: calls add theirs as they finish (from pool threads), and
    # every full BatchWriteItem's worth is written at once, so a crash re-does at most the
    # reactions of the last few calls, not of the whole round.
    _unmarked: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def mode(self, route: Route) -> Idempotency:
        return route.idempotency if self.store is not None else Idempotency.OFF

    def completed(self, keys: Sequence[str]) -> set[str]:
        if self.store is None or not keys:
            return set()
        return durably("read idempotency records", lambda: self.store.completed(keys, self.clock()), self.sleep)

    def lock(self, keys: Sequence[str]) -> tuple[set[str], set[str], dict[str, BaseException]]:
        """(locked, already completed, could not lock: why) for PER_CHANGE keys."""
        now = self.clock()
        self._hung = {k: until for k, until in self._hung.items() if until > now}
        failed: dict[str, BaseException] = {
            k: DeferredError("an earlier call for this change timed out", until=self._hung[k])
            for k in keys if k in self._hung
        }
        todo = [k for k in keys if k not in failed]
        refused = self.store.save_inprogress_many(todo, now) if todo else {}
        duplicate = set()
        for key, exc in refused.items():
            if isinstance(exc, FatalProcessingError):
                raise exc
            if isinstance(exc, IdempotencyAlreadyCompletedError):
                duplicate.add(key)
            else:
                failed[key] = exc
        return {k for k in todo if k not in refused}, duplicate, failed

    def done(self, keys: Sequence[str]) -> None:
        """Reactions just done (called as each call finishes, from its thread): their markers
        are written 25 at a time as soon as 25 are waiting; `finish` writes the rest."""
        with self._lock:
            self._unmarked += keys
            full = len(self._unmarked) - len(self._unmarked) % MARKERS_PER_CALL
            chunk, self._unmarked = self._unmarked[:full], self._unmarked[full:]
        if not chunk:
            return
        try:
            self.store.save_success(chunk, self.clock())
        except Exception as exc:  # noqa: BLE001 - kept for `finish`, which must make them durable
            with self._lock:
                self._unmarked += chunk
            log.warning("done-markers not written yet", extra={"markers": len(chunk), "error": describe(exc)})

    def finish(self, failed: dict[str, BaseException]) -> None:
        """Make every done-marker durable (or Fatal) and release the locks of `failed`,
        except those whose call timed out: that call may still be running."""
        with self._lock:
            rest, self._unmarked = self._unmarked, []
        durably("mark reactions done", lambda: self.store.save_success(rest, self.clock()), self.sleep)
        now, release = self.clock(), []
        for key, exc in failed.items():
            if isinstance(exc, HandlerTimeout):
                self._hung[key] = now + self.store.lock_seconds
            else:
                release.append(key)
        try:
            self.store.delete(release)
        except FatalProcessingError:
            raise
        except Exception as exc:  # noqa: BLE001 - the lease expires anyway, and we may re-take our own lock
            log.warning("could not release idempotency locks", extra={"locks": len(release), "error": describe(exc)})

    def late(self) -> None:
        """A timed-out call finished after all (and said what it did, `done`): write its
        markers now, nothing else will soon (best effort; the next `finish` retries)."""
        with self._lock:
            rest, self._unmarked = self._unmarked, []
        if rest:
            try:
                self.store.save_success(rest, self.clock())
            except Exception:
                with self._lock:
                    self._unmarked += rest
                raise
            log.warning("a timed-out call finished late; its reactions are marked done", extra={"done": len(rest)})

    def atomic(self, changes: Sequence[ChangeRecord], keys: Sequence[str | None], call: Call) -> CallResult:
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
        # A commit that timed out but landed leaves its markers, so the retry finds them:
        # DUPLICATE, not counted twice.
        committed = self.store.commit([(keys[i], output[i]) for i in todo], self.clock())
        result.done = [todo[j] for j in committed.done]
        result.duplicate = [todo[j] for j in committed.duplicate]
        result.failed.update({todo[j]: exc for j, exc in committed.failed.items()})
        return result


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
                raise FatalProcessingError(f"could not {what}: {describe(exc)}") from exc
            log.warning("store call failed, retrying", extra={"what": what, "attempt": attempt, "error": describe(exc)})
            sleep(min(5.0, 0.1 * 2**attempt))
    raise AssertionError("unreachable")
