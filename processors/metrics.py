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

Exactly once: the route is ATOMIC. ``aggregate`` writes nothing; it returns each change's
deltas as counter updates, and the idempotency store commits them: the updates of up to
~90 changes summed per (table, key), with those changes' done-markers, in one
TransactWriteItems (all or nothing). A change redelivered after a crash, however the new
batch is cut, finds its marker and is not counted again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from orders_cdc.change import ChangeRecord
from orders_cdc.counters import CounterUpdate
from orders_cdc.logs import record_fields
from orders_cdc.routing import Idempotency, Route
from orders_cdc.settings import Resources
from processors import _order

if TYPE_CHECKING:
    from orders_cdc.app import Context

log = logging.getLogger(__name__)

ORDER = "order"
PRODUCT = "product"
Key = tuple[str, tuple[tuple[str, str], ...]]  # (ORDER|PRODUCT, key pairs)
Deltas = dict[Key, dict[str, Decimal]]


def _add(into: Deltas, key: Key, attr: str, value: Decimal) -> None:
    counters = into.setdefault(key, {})
    counters[attr] = _order.exact_add(counters.get(attr, Decimal(0)), value)


def contribution(image: Mapping[str, Any] | None, sign: int = 1, into: Deltas | None = None,
                 change: ChangeRecord | None = None) -> Deltas:
    """What one order image counts for, times ``sign``, added into ``into``."""
    into = {} if into is None else into
    if image is None:
        return into
    day = _order.day(image)
    if day is None:
        log.warning("order without created_at is not counted",
                    extra=record_fields(change, route="metrics.aggregates", outcome="not_counted")
                    | ({} if change is not None else {"order_id": image.get("order_id")}))
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
    out = contribution(change.new_image, +1, change=change)
    return contribution(change.old_image, -1, out, change=change)


def aggregate(change: ChangeRecord, ctx: Context) -> list[CounterUpdate]:
    """The change's counter updates (bad order data raises: that change fails alone)."""
    resources = ctx.settings.resources
    tables = {ORDER: resources.order_metrics_table, PRODUCT: resources.product_metrics_table}
    return [CounterUpdate.of(tables[kind], dict(key), nonzero)
            for (kind, key), counters in deltas(change).items()
            if (nonzero := {attr: value for attr, value in counters.items() if value})]


def not_ttl_delete(change: ChangeRecord) -> bool:
    return not change.ttl_delete


def routes(resources: Resources) -> list[Route]:
    # Summed per batch and committed with the done-markers: no lock, no call per change.
    return [Route("metrics.aggregates", resources.orders_table, aggregate, when=not_ttl_delete,
                  idempotency=Idempotency.ATOMIC, per_change=True)]
