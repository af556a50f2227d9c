"""Calls in flight within one shard's batch: a bounded pool with a deadline per call.

The daemon gives a shard's child one batch at a time (notes/aws-limits.md), so a shard goes
as fast as its child keeps calls in flight. `CallPool` runs up to `capacity` calls at once
on long-lived worker threads (boto3 clients are thread-safe); the rest wait in line, which
is the back-pressure. Each call has a deadline from the moment it starts (Flink Async I/O's
timeout): past it the caller gets HandlerTimeout and moves on. Python cannot kill a thread,
so the abandoned call keeps running on its own thread (a fresh worker takes its place) and
its `on_late` hook runs when it ends, so a side effect that did happen is still recorded.
Past `max_abandoned` such threads the child is wedged and exits (FatalProcessingError).

Once `stopping` is set (the worker was asked to stop), no call starts: those still in line
get NotStarted, the ones in flight run to their end.

A call is not started unless its whole timeout fits before the batch's deadline: a send
that could not finish in the time left is not begun (it gets NotStarted, spending nothing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orders_cdc.errors import DeferredError, FatalProcessingError, HandlerTimeout, describe

log = logging.getLogger(__name__)


class NotStarted(DeferredError):
    """The batch had no time left for this call: nothing was done, try again later."""


@dataclass(eq=False)
class Call:
    fn: Callable[[], Any]
    on_late: Callable[[Any], None] | None = None  # the result of a call that finished after its deadline
    timeout: float = 0.0
    deadline: float = 0.0
    started: float | None = None
    finished: bool = False
    abandoned: bool = False
    result: Any = None


class Pool:
    """How the pipeline runs a round's calls: `run` returns, for each call in order, what
    it returned or the exception it raised (HandlerTimeout past its deadline)."""

    capacity: int = 1
    most_in_flight: int = 0
    # Set from a signal handler: a plain attribute (no lock may be taken there).
    stopping: bool = False

    def run(self, calls: Sequence[Call], timeout: float, time_left: float) -> list[Any]:
        raise NotImplementedError


class InlinePool(Pool):
    """One call after another in the caller's thread, no deadline: for tests whose handlers
    cannot hang."""

    def run(self, calls: Sequence[Call], timeout: float, time_left: float) -> list[Any]:
        out: list[Any] = []
        for call in calls:
            if self.stopping:
                out.append(NotStarted("the worker is stopping"))
                continue
            try:
                out.append(call.fn())
            except FatalProcessingError:
                raise
            except Exception as exc:  # noqa: BLE001 - handed back as the call's result
                out.append(exc)
        self.most_in_flight = max(self.most_in_flight, 1 if calls else 0)
        return out


@dataclass(eq=False)
class CallPool(Pool):
    capacity: int = 64
    max_abandoned: int = 8
    clock: Callable[[], float] = time.time
    most_in_flight: int = 0
    stopping: bool = False
    _queue: deque[Call] = field(default_factory=deque, init=False, repr=False)
    # One lock, two conditions: idle workers wait for calls (`_work_ready`, one woken per call), the
    # caller waits for starts and ends (`_done`), so a finishing call wakes no idle worker.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _work_ready: threading.Condition = field(init=False, repr=False)
    _done: threading.Condition = field(init=False, repr=False)
    _workers: int = field(default=0, init=False)
    _idle: int = field(default=0, init=False)
    _running: int = field(default=0, init=False)
    _abandoned: list[Call] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._work_ready, self._done = threading.Condition(self._lock), threading.Condition(self._lock)

    def run(self, calls: Sequence[Call], timeout: float, time_left: float) -> list[Any]:
        """Run `calls` concurrently; each gets `timeout` seconds from its start, and none
        starts unless that fits in the `time_left` (seconds from now) of the batch."""
        deadline = self.clock() + time_left
        with self._lock:
            self._abandoned = [c for c in self._abandoned if not c.finished]
            if len(self._abandoned) >= self.max_abandoned:
                raise FatalProcessingError(f"{len(self._abandoned)} handler calls are still hung")
            for call in calls:
                call.timeout, call.deadline = timeout, deadline
                self._queue.append(call)
            self._spawn(min(len(self._queue), self.capacity - self._running) - self._idle)
            self._work_ready.notify(len(calls))
            while True:
                now = self.clock()
                waiting = [c for c in calls if not c.finished and not c.abandoned]
                if not waiting:
                    break
                wake = None
                for call in waiting:
                    if call.started is None:
                        continue
                    ends = min(call.started + timeout, deadline)
                    if now >= ends:
                        self._abandon(call, now - call.started)
                    else:
                        wake = ends if wake is None else min(wake, ends)
                if all(c.finished or c.abandoned for c in calls):
                    break
                self._done.wait(None if wake is None else max(0.001, wake - now))
        return [c.result for c in calls]

    def _abandon(self, call: Call, ran: float) -> None:
        call.abandoned = True
        call.result = HandlerTimeout(f"handler did not return within {ran:.1f}s")
        self._running -= 1
        self._abandoned.append(call)
        log.error("handler call timed out", extra={"timeout_s": round(ran, 3), "hung": len(self._abandoned)})
        self._spawn(1 if self._queue and self._idle == 0 else 0)  # its thread is lost to the pool

    def _spawn(self, n: int) -> None:
        for _ in range(max(0, n)):
            if self._workers - sum(not c.finished for c in self._abandoned) >= self.capacity:
                return
            self._workers += 1
            threading.Thread(target=self._work, name="call", daemon=True).start()

    def _work(self) -> None:
        with self._lock:
            while True:
                while not self._queue:
                    self._idle += 1
                    self._work_ready.wait()
                    self._idle -= 1
                call = self._queue.popleft()
                now = self.clock()
                if self.stopping or now + call.timeout > call.deadline:
                    why = "the worker is stopping" if self.stopping else "no time left in this batch for the call"
                    call.result, call.finished = NotStarted(why), True
                    call = None
                    self._done.notify_all()
                    continue
                call.started = now
                self._running += 1
                self.most_in_flight = max(self.most_in_flight, self._running)
                self._done.notify_all()  # the caller now watches this call's deadline
                self._lock.release()
                try:
                    result: Any = call.fn()
                except BaseException as exc:  # noqa: BLE001 - handed back as the call's result
                    result = exc
                self._lock.acquire()
                call.finished = True
                if call.abandoned:
                    self._workers -= 1
                    late = call.on_late
                    break
                self._running -= 1
                call.result = result
                # An idle worker must not keep its last call (and through it that call's
                # changes, a whole batch for a counter route) alive into the next batch.
                call = result = None
                self._done.notify_all()
        if late is not None:
            try:
                late(result)
            except Exception as exc:  # noqa: BLE001 - nothing is waiting for it any more
                log.error("late completion of a timed-out call not recorded", extra={"error": describe(exc)})
