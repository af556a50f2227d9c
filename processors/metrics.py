"""Real-time aggregates, kept right under inserts, edits, cancellations and deletes.

- ``OrderMetrics``   (day): ``order_count``, ``revenue`` (sum of ``total``), ``cancelled_count``
- ``ProductMetrics`` (product_id, day): ``units``, ``revenue`` (sum of quantity * unit_price)

``day`` is the UTC date of the order's ``created_at``, so every later change of an order
corrects the day the order was counted on.

The rule: an order image *contributes* to the aggregates. A live (not cancelled) order
contributes 1 order, its total, and its lines; a cancelled order contributes only
``cancelled_count`` 1; an image without ``created_at`` contributes nothing (it cannot be put
on a day; logged). Each change applies contribution(new image) - contribution(old image):

- INSERT adds the order; a MODIFY that changes items or total adds the difference;
- a cancellation subtracts the order's sales (and counts the cancellation); a reinstated
  order adds them back;
- a REMOVE made by the application subtracts the order: a deleted order (test data, an
  erasure request, a mistake) should not be in the numbers. A TTL REMOVE (DynamoDB expiring
  an old order) is not routed here: the order happened, it only left the hot table.

Batched: the deltas of the whole batch are summed per (table, key) in memory, and only
the non-zero sums are written, as ADD updates in TransactWriteItems of up to 100 items
(one call for a typical batch: a few days x a few dozen products). A transaction is
all-or-nothing, so a retried batch never re-applies half its sums; its ClientRequestToken
(from the batch's event ids) makes a retry within 10 minutes a no-op. Not idempotent
under redelivery (ADD): the idempotency store must drop already-applied changes *before*
this handler, which is a pure function of the changes it is given.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from orders_cdc.change import ChangeRecord
from orders_cdc.routing import Idempotency, Route
from orders_cdc.settings import Resources
from processors import _order
from processors._batch import each, raise_failures
from processors._dynamodb import add_counters

log = logging.getLogger(__name__)

ORDER = "order"
PRODUCT = "product"
Key = tuple[str, tuple[tuple[str, str], ...]]  # (ORDER|PRODUCT, key pairs)
Deltas = dict[Key, dict[str, Decimal]]


def _add(into: Deltas, key: Key, attr: str, value: Decimal) -> None:
    counters = into.setdefault(key, {})
    counters[attr] = _order.exact_add(counters.get(attr, Decimal(0)), value)


def contribution(image: Mapping[str, Any] | None, sign: int = 1, into: Deltas | None = None) -> Deltas:
    """What one order image counts for, times ``sign``, added into ``into``."""
    into = {} if into is None else into
    if image is None:
        return into
    day = _order.day(image)
    if day is None:
        log.warning("order without created_at is not counted", extra={"order_id": image.get("order_id")})
        return into
    one = Decimal(sign)
    order_key: Key = (ORDER, (("day", day.isoformat()),))
    if _order.status(image) == "cancelled":
        _add(into, order_key, "cancelled_count", one)
        return into
    _add(into, order_key, "order_count", one)
    _add(into, order_key, "revenue", _order.exact_mul(one, _order.total(image)))
    for product_id, line in _order.lines(image).items():
        product_key: Key = (PRODUCT, (("product_id", product_id), ("day", day.isoformat())))
        _add(into, product_key, "units", _order.exact_mul(one, line.quantity))
        _add(into, product_key, "revenue", _order.exact_mul(one, line.amount))
    return into


def deltas(change: ChangeRecord) -> Deltas:
    """contribution(new) - contribution(old) for one change."""
    out = contribution(change.new_image, +1)
    return contribution(change.old_image, -1, out)


def aggregate(changes: Sequence[ChangeRecord], ctx) -> None:
    resources = ctx.settings.resources
    tables = {ORDER: resources.order_metrics_table, PRODUCT: resources.product_metrics_table}
    failures: dict[int, BaseException] = {}
    per_change = each(changes, deltas, failures)  # bad order data fails only its own change
    total: Deltas = {}
    for change_deltas in per_change.values():
        for key, counters in change_deltas.items():
            for attr, value in counters.items():
                _add(total, key, attr, value)
    updates = []
    for (kind, key), counters in sorted(total.items()):
        nonzero = {attr: value for attr, value in sorted(counters.items()) if value}
        if nonzero:
            updates.append((tables[kind], dict(key), nonzero))
    if updates:
        seed = hashlib.sha256("|".join(changes[i].event_id for i in per_change).encode()).hexdigest()
        try:
            add_counters(ctx.clients.dynamodb, updates, token_seed=f"metrics|{seed}")
        except Exception as exc:  # noqa: BLE001 - the sums mix every change: all of them retry
            failures.update({i: exc for i in per_change})
    raise_failures(failures)


def not_ttl_delete(change: ChangeRecord) -> bool:
    return not change.ttl_delete


def routes(resources: Resources) -> list[Route]:
    # One transaction of ADDs per batch: done-markers after it, not a lock per change.
    return [Route("metrics.aggregates", resources.orders_table, aggregate, when=not_ttl_delete,
                  idempotency=Idempotency.PER_BATCH)]
