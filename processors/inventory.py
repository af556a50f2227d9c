"""Inventory: stock movements caused by shipping and cancelling orders.

The model, one Inventory row per product_id, three counters:

- ``on_hand``   units physically in the warehouse (stock intake adds to it elsewhere);
- ``reserved``  units promised to open (pending/processing) orders. The order service
                reserves them when it writes the order (it must: overselling is prevented
                synchronously, not by a stream consumer), and keeps the reservation equal
                to the open order's items. This consumer only settles reservations;
- ``shipped``   units that left with an order, cumulative.

Available to sell = on_hand - reserved.

| status change                        | counters (per product)                                  |
|--------------------------------------|---------------------------------------------------------|
| pending/processing -> shipped        | reserved -= old qty, on_hand -= new qty, shipped += new |
| (new) / cancelled / other -> shipped | on_hand -= qty, shipped += qty (nothing was reserved)   |
| delivered -> shipped                 | nothing (the stock left already)                        |
| pending/processing -> cancelled      | reserved -= old qty (the reservation is released)       |
| shipped -> cancelled                 | on_hand += old qty, shipped -= old qty (returned)       |
| delivered / (new) -> cancelled       | nothing (goods are with the customer / never reserved)  |

"old qty" is from the image before the change (what was reserved or sent), "new qty" from
the image after it (what is leaving now); they differ only if one write changed both
status and items.

Exactly once: the route is ATOMIC. ``settle`` writes nothing; it returns each change's
movements as counter updates, and the idempotency store commits them with the change's
done-marker in one TransactWriteItems (all of an order's products and its marker, or
none; several changes share a transaction). A redelivery finds the marker.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING

from orders_cdc.change import ChangeRecord, EventName
from orders_cdc.counters import CounterUpdate
from orders_cdc.routing import Idempotency, Route, transition
from orders_cdc.settings import Resources
from processors import _order

if TYPE_CHECKING:
    from orders_cdc.app import Context

_UPSERTS = frozenset({EventName.INSERT, EventName.MODIFY})

Movements = dict[str, dict[str, Decimal]]  # product_id -> counter -> delta


def _apply(into: Movements, lines: Mapping[str, _order.ProductLine], **sign: int) -> None:
    for product_id, line in lines.items():
        counters = into.setdefault(product_id, {})
        for counter, s in sign.items():
            delta = line.quantity if s > 0 else -line.quantity
            counters[counter] = _order.exact_add(counters.get(counter, Decimal(0)), delta)


def movements(change: ChangeRecord) -> Movements:
    """The inventory deltas one change causes (see the table above); {} for none."""
    new = change.new_image
    old = change.old_image if change.event is EventName.MODIFY else None
    now, before = _order.status(new), _order.status(old)
    out: Movements = {}
    if now == "shipped" and before != "shipped":
        if before == "delivered":
            return {}
        if before in _order.OPEN:
            _apply(out, _order.lines(old), reserved=-1)
        _apply(out, _order.lines(new), on_hand=-1, shipped=+1)
    elif now == "cancelled" and before != "cancelled":
        if before in _order.OPEN:
            _apply(out, _order.lines(old), reserved=-1)
        elif before == "shipped":
            _apply(out, _order.lines(old), on_hand=+1, shipped=-1)
    return {p: {c: d for c, d in counters.items() if d} for p, counters in out.items() if any(counters.values())}


def settle(change: ChangeRecord, ctx: Context) -> list[CounterUpdate]:
    """The change's movements as counter updates (bad order data raises: that change fails alone)."""
    table = ctx.settings.resources.inventory_table
    return [CounterUpdate.of(table, {"product_id": p}, d) for p, d in movements(change).items()]


def routes(resources: Resources) -> list[Route]:
    table = resources.orders_table
    return [
        Route("inventory.shipped", table, settle, events=_UPSERTS, when=transition("status", "shipped"),
              idempotency=Idempotency.ATOMIC, per_change=True),
        Route("inventory.cancelled", table, settle, events=_UPSERTS, when=transition("status", "cancelled"),
              idempotency=Idempotency.ATOMIC, per_change=True),
    ]
