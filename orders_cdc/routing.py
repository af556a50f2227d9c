"""Declarative routes: table, event name(s), an optional predicate, and the handler.

Each processors/ module declares its own ROUTES; they are merged once at start. One change
may match several routes; each matching handler sees it once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from orders_cdc.change import ChangeRecord, EventName

if TYPE_CHECKING:
    from orders_cdc.app import Context

Predicate = Callable[[ChangeRecord], bool]


class Handler(Protocol):
    """A plain function over a batch of changes (in stream order; one item's changes in a
    call are in stream order too, and no other call of the route holds that item).

    Return normally when all are done; raise PartialBatchFailure for some, or any
    exception for all of them. An ATOMIC route's handler returns its counter updates
    instead (see Idempotency.ATOMIC).
    """

    def __call__(self, changes: Sequence[ChangeRecord], ctx: Context) -> Any: ...


class ChangeHandler(Protocol):
    """A plain function over one change (a `per_change` route): return when done, raise
    when not. The pipeline runs many at once, never two of one item on one route."""

    def __call__(self, change: ChangeRecord, ctx: Context) -> None: ...


ALL_EVENTS = frozenset(EventName)
_MISSING = object()


class Idempotency(StrEnum):
    """How a route's reactions are kept to one per change (see pipeline.py for the cost)."""

    PER_CHANGE = "per_change"  # a lock per change before the handler: emails, refunds, movements
    # Counters: the handler writes nothing and returns, per change, the CounterUpdates it
    # stands for (or an exception for a change it cannot handle); the store commits them
    # with the change's done-marker in one transaction. Exactly once, crashes included.
    ATOMIC = "atomic"
    OFF = "off"  # at-least-once: copies that downstream dedups, or self-guarding writes


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    table: str
    handler: Handler | ChangeHandler
    events: frozenset[EventName] = ALL_EVENTS
    when: Predicate | None = None
    idempotency: Idempotency = Idempotency.PER_CHANGE
    # The handler takes one change (ChangeHandler) instead of a list: an API with no batch
    # call (SES). The pipeline keeps many such calls in flight.
    per_change: bool = False
    # Most changes per handler call (None: every change ready; per_change: 1). A round's
    # calls of one route run concurrently, except an ATOMIC route's (its transactions share
    # counter items, which concurrent transactions would fight over).
    max_batch: int | None = None

    @property
    def idempotent(self) -> bool:
        return self.idempotency is not Idempotency.OFF

    def matches(self, change: ChangeRecord) -> bool:
        return (
            change.table == self.table
            and change.event in self.events
            and (self.when is None or self.when(change))
        )


def transition(field: str, to: Any, from_: Any = _MISSING) -> Predicate:
    """`field` changes to `to` (from `from_`, or from anything else).

    An INSERT that arrives with the value counts as a transition from nothing; a MODIFY
    whose value did not change does not match, so a re-save of a shipped order sends no
    second email.
    """

    def predicate(change: ChangeRecord) -> bool:
        if change.event is EventName.REMOVE:
            return False
        new = change.new_value(field)
        if new != to:
            return False
        old = change.old_value(field) if change.event is EventName.MODIFY else None
        if old == new:
            return False
        return from_ is _MISSING or old == from_

    predicate.__name__ = f"transition({field}: {'*' if from_ is _MISSING else from_!r} -> {to!r})"
    return predicate


class Router:
    def __init__(self, routes: Iterable[Route]):
        self.routes: tuple[Route, ...] = tuple(routes)
        names = [r.name for r in self.routes]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ValueError(f"duplicate route names: {sorted(duplicated)}")

    def match(self, change: ChangeRecord) -> tuple[Route, ...]:
        return tuple(route for route in self.routes if route.matches(change))
