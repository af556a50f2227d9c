"""Counter updates (ADD deltas) that a route hands back instead of writing them.

An ATOMIC route (see routing.Idempotency) is a pure function from changes to the counter
updates each change stands for. The idempotency store commits a group of changes' updates
*together with their done-markers* in one DynamoDB TransactWriteItems, so a change is
counted exactly once even if the worker dies between two calls: either the counters and
the marker are both written, or neither is.

A transaction holds at most 100 items and touches an item once, so the changes are cut into
groups whose merged updates plus markers fit; one change is never split across two groups.
A change that alone does not fit (an order of 99+ products) is committed in parts, each
with a marker of its own (IdempotencyStore.commit).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow
from typing import Any

from botocore.exceptions import ClientError

from orders_cdc.attrvalue import marshal
from orders_cdc.errors import PermanentError, RetryableError, error_code

MAX_TRANSACTION_ITEMS = 100  # TransactWriteItems limit
# Exact arithmetic in DynamoDB's 38 significant digits: anything inexact raises (also used by
# processors/_order.py for order amounts).
EXACT = Context(prec=38, traps=[Inexact, InvalidOperation, Overflow])
# Reasons a transaction is cancelled that a later attempt can get past.
_RETRYABLE_REASONS = frozenset({"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded",
                                "RequestLimitExceeded"})

ItemKey = tuple[str, tuple[tuple[str, Any], ...]]  # (table, sorted key pairs)


@dataclass(frozen=True, slots=True)
class CounterUpdate:
    """ADD each of ``deltas`` to the item ``key`` of ``table``."""

    table: str
    key: tuple[tuple[str, Any], ...]
    deltas: tuple[tuple[str, Decimal], ...]

    @classmethod
    def of(cls, table: str, key: Mapping[str, Any], deltas: Mapping[str, Decimal]) -> CounterUpdate:
        return cls(table, tuple(sorted(key.items())), tuple(sorted(deltas.items())))

    @property
    def item(self) -> ItemKey:
        return self.table, self.key


class CounterOverflow(PermanentError):
    """A sum that DynamoDB cannot hold exactly (38 significant digits)."""


class TooManyCounters(PermanentError):
    """One change touches more items than a transaction can hold with its marker."""


def merge(updates: Iterable[CounterUpdate]) -> list[CounterUpdate]:
    """One update per item, the deltas summed; deltas that sum to 0 are dropped, and so is
    an item left with none. Sorted, so a retry sends the same transaction."""
    sums: dict[ItemKey, dict[str, Decimal]] = {}
    for update in updates:
        counters = sums.setdefault(update.item, {})
        for attr, delta in update.deltas:
            try:
                counters[attr] = EXACT.add(counters.get(attr, Decimal(0)), delta)
            except ArithmeticError as exc:
                raise CounterOverflow(f"{update.table} {dict(update.key)} {attr}: sum not exact in 38 digits") from exc
    out = []
    for (table, key), counters in sorted(sums.items(), key=lambda kv: repr(kv[0])):
        nonzero = tuple(sorted((a, d) for a, d in counters.items() if d))
        if nonzero:
            out.append(CounterUpdate(table, key, nonzero))
    return out


def items_of(updates: Sequence[CounterUpdate], limit: int = MAX_TRANSACTION_ITEMS) -> set[ItemKey]:
    """The items one change's updates touch; TooManyCounters if they and the change's
    done-marker cannot share one transaction."""
    items = {u.item for u in updates}
    if len(items) + 1 > limit:
        raise TooManyCounters(f"a change touches {len(items)} counters; one transaction holds {limit - 1}")
    return items


def groups(entries: Sequence[Sequence[CounterUpdate]], limit: int = MAX_TRANSACTION_ITEMS) -> list[list[int]]:
    """Cut entries (one per change, in order) into groups whose distinct items plus one
    marker per change fit in ``limit``. An entry that alone does not fit raises TooManyCounters."""
    out: list[list[int]] = []
    current: list[int] = []
    items: set[ItemKey] = set()
    for i, updates in enumerate(entries):
        own = items_of(updates, limit)
        if current and len(items | own) + len(current) + 1 > limit:
            out.append(current)
            current, items = [], set()
        current.append(i)
        items |= own
    if current:
        out.append(current)
    return out


def update_action(update: CounterUpdate) -> dict[str, Any]:
    """The TransactWriteItems ``Update`` of one counter update."""
    return {
        "TableName": update.table,
        "Key": {k: marshal(v) for k, v in update.key},
        "UpdateExpression": "ADD " + ", ".join(f"#a{i} :v{i}" for i in range(len(update.deltas))),
        "ExpressionAttributeNames": {f"#a{i}": attr for i, (attr, _) in enumerate(update.deltas)},
        "ExpressionAttributeValues": {f":v{i}": marshal(delta) for i, (_, delta) in enumerate(update.deltas)},
    }


def transaction_error(exc: ClientError) -> BaseException:
    """A cancelled transaction as a domain error (the caller has already taken out the
    cancellations it understands, such as a marker that exists)."""
    if error_code(exc) == "TransactionCanceledException":
        reasons = {r.get("Code") for r in exc.response.get("CancellationReasons", [])} - {"None", None}
        if reasons & _RETRYABLE_REASONS or not reasons:
            return RetryableError(f"transaction cancelled ({', '.join(sorted(reasons)) or 'no reason'})")
        return PermanentError(f"transaction cancelled ({', '.join(sorted(reasons))})")
    return exc  # the pipeline classifies the rest (throttling, 5xx: retry; validation: dead-letter)
