"""The ProductOrders view: one row per (product_id, order_id) for every product an order holds.

A row holds ``quantity``, ``unit_price`` (absent if the order lists the product twice at
different prices), ``amount``, ``product_name``, ``order_created_at``, ``customer_id`` and
``currency``: what the order says of that product, not the order's status. So a row
changes only when the order's line items do: INSERT writes a row per product; a MODIFY
rewrites the rows whose content changed and retires the rows of products no longer in the
order; a status change (most MODIFYs) writes nothing; REMOVE (TTL or not: the view mirrors
the table) retires all of the order's rows. A reader who wants the status joins on the
order (or the Orders replica).

Stale and duplicated changes: every row carries the version of the change that wrote it,
``source_created_us`` (the change's creation time, µs) and ``source_sequence`` (its padded
Kinesis sequence number, a tie-break for changes in the same microsecond: millisecond
precision streams have many). Every write is a conditional put::

    attribute_not_exists(source_created_us) OR source_created_us < :us
    OR (source_created_us = :us AND source_sequence < :seq)

so an older or repeated change cannot overwrite a newer one; its ConditionalCheckFailed
means "stale", which is not an error. A retired row is not deleted but replaced by a
tombstone (``deleted: true``, its version, ``expires_at`` = change time + 7 days for
DynamoDB TTL): a deleted row would forget its version, and a late duplicate of an older
change would bring it back. Readers skip tombstones (``attribute_not_exists(deleted)``);
TTL must be enabled on ``expires_at`` to clear them.

The conditions rule out BatchWriteItem (no conditions). The puts of a handler call go 100
to a TransactWriteItems, each with its own condition (processors/_conditional.py); the
transaction is cancelled when any condition fails, and CancellationReasons say which: those
rows are stale, and the transaction is sent again without them (rare: a redelivery or an
overtaken change). A row two changes of the call write is put once, with the newer change's
content and version. A request DynamoDB refuses as a whole (ValidationException) is retried
row by row, so that one bad row fails only its own change. Transactions cost twice the
write capacity of plain puts; one call per 100 rows instead of one per row is what keeps up
with a shard.
Naturally idempotent: a redelivered change is stale against its own rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orders_cdc.attrvalue import marshal
from orders_cdc.change import ChangeRecord, EventName
from orders_cdc.routing import Idempotency, Route
from orders_cdc.settings import Resources
from processors import _order
from processors._batch import raise_failures
from processors._conditional import ConditionalPut, put_all

if TYPE_CHECKING:
    from orders_cdc.app import Context

log = logging.getLogger(__name__)

TOMBSTONE_SECONDS = 7 * 24 * 3600
_CONDITION = (
    "attribute_not_exists(source_created_us) OR source_created_us < :us"
    " OR (source_created_us = :us AND source_sequence < :seq)"
)


def version(change: ChangeRecord) -> tuple[int, str]:
    """(source_created_us, source_sequence): orders a change among its item's changes."""
    p = change.position
    # Zero-padded so that string order is numeric order (sequence numbers vary in length).
    sequence = f"{p.sequence_number:0>128}:{p.sub_sequence_number:010d}" if p else ""
    return change.created_us, sequence


def row_content(order: Mapping[str, Any], line: _order.ProductLine) -> dict[str, Any]:
    content = {
        "quantity": line.quantity,
        "unit_price": line.unit_price,
        "amount": line.amount,
        "product_name": line.name,
        "order_created_at": order.get("created_at"),
        "customer_id": order.get("customer_id"),
        "currency": order.get("currency"),
    }
    return {k: v for k, v in content.items() if v is not None}


def writes(change: ChangeRecord) -> list[tuple[str, dict[str, Any] | None]]:
    """(product_id, row content, or None for a tombstone) for every row this change sets."""
    new = change.new_image if change.event is not EventName.REMOVE else None
    old = change.old_image if change.event is not EventName.INSERT else None
    new_lines, old_lines = _order.lines(new), _order.lines(old)
    out: list[tuple[str, dict[str, Any] | None]] = []
    for product_id, line in new_lines.items():
        content = row_content(new, line)  # type: ignore[arg-type]
        if product_id in old_lines and row_content(old, old_lines[product_id]) == content:  # type: ignore[arg-type]
            continue  # unchanged: the row already says this (the old image is its state)
        out.append((product_id, content))
    out += [(product_id, None) for product_id in old_lines if product_id not in new_lines]
    return out


Key = tuple[str, str]  # (product_id, order_id)


@dataclass(eq=False, slots=True)
class _Put:
    item: dict[str, Any]
    us: int
    seq: str
    writers: list[int]  # the changes (indices in the call) whose write this is


def rows(change: ChangeRecord) -> list[tuple[Key, dict[str, Any], int, str]]:
    """(row key, the full item, version us, version seq) for every row this change writes."""
    order_id = _order.order_id(change.new_image or change.old_image, change.keys)
    us, seq = version(change)
    out = []
    for product_id, content in writes(change):
        item: dict[str, Any] = {"product_id": product_id, "order_id": order_id}
        if content is None:
            item.update(deleted=True, expires_at=us // 1_000_000 + TOMBSTONE_SECONDS)
        else:
            item.update(content)
        item.update(source_created_us=us, source_sequence=seq)
        out.append(((product_id, order_id), item, us, seq))
    return out


def _request(table: str, put: _Put) -> dict[str, Any]:
    return {
        "TableName": table,
        "Item": {k: marshal(v) for k, v in put.item.items()},
        "ConditionExpression": _CONDITION,
        "ExpressionAttributeValues": {":us": {"N": str(put.us)}, ":seq": {"S": put.seq}},
    }


def product_orders(changes: Sequence[ChangeRecord], ctx: Context) -> None:
    ddb = ctx.clients.dynamodb
    table = ctx.settings.resources.product_orders_table
    failures: dict[int, BaseException] = {}
    puts: dict[Key, _Put] = {}
    for i, change in enumerate(changes):  # stream order: a later write of a row replaces an earlier one
        try:
            written = rows(change)
        except Exception as exc:  # noqa: BLE001 - a change with bad order data fails alone
            failures[i] = exc
            continue
        for key, item, us, seq in written:
            earlier = puts.get(key)
            writers = earlier.writers + [i] if earlier else [i]
            if earlier and (earlier.us, earlier.seq) > (us, seq):
                earlier.writers = writers
            else:
                puts[key] = _Put(item, us, seq, writers)
    requests = []
    for put in puts.values():
        try:
            requests.append(ConditionalPut(_request(table, put), put.writers))
        except Exception as exc:  # noqa: BLE001 - a row that cannot be marshalled fails its changes only
            for i in put.writers:
                failures.setdefault(i, exc)
    stale = put_all(ddb, requests, failures)
    if stale:
        # Expected under at-least-once delivery: a duplicate, or a change overtaken.
        log.info("stale rows ignored by the view", extra={"stale_rows": stale})
    raise_failures(failures)


def routes(resources: Resources) -> list[Route]:
    # Conditional writes with a per-row version: a redelivery is stale against its own rows.
    return [Route("views.product_orders", resources.orders_table, product_orders, idempotency=Idempotency.OFF,
                  max_batch=50)]
