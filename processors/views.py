"""The ProductOrders view: one row per (product_id, order_id) for every product an order holds.

A row holds ``quantity``, ``unit_price`` (absent if the order lists the product twice at
different prices), ``amount``, ``product_name``, the order's ``status``,
``order_created_at``, ``customer_id`` and ``currency``. INSERT writes a row per product;
MODIFY rewrites the rows whose content changed (status included) and retires the rows of
products no longer in the order; REMOVE (TTL or not: the view mirrors the table) retires
all of the order's rows.

Stale and duplicated changes: every row carries the version of the change that wrote it,
``source_created_us`` (the change's creation time, µs) and ``source_sequence`` (its padded
Kinesis sequence number, a tie-break for changes in the same microsecond: millisecond
precision streams have many). Every write is a conditional PutItem::

    attribute_not_exists(source_created_us) OR source_created_us < :us
    OR (source_created_us = :us AND source_sequence < :seq)

so an older or repeated change cannot overwrite a newer one; its ConditionalCheckFailed
means "stale", which is not an error. A retired row is not deleted but replaced by a
tombstone (``deleted: true``, its version, ``expires_at`` = change time + 7 days for
DynamoDB TTL): a deleted row would forget its version, and a late duplicate of an older
change would bring it back. Readers skip tombstones (``attribute_not_exists(deleted)``);
TTL must be enabled on ``expires_at`` to clear them.

Writes are conditional, so BatchWriteItem (which takes no conditions) is not used: one
PutItem per row written. A MODIFY whose view content did not change (``updated_at`` only)
writes nothing. Naturally idempotent: a redelivered change is stale against its own rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import ClientError

from orders_cdc.attrvalue import marshal
from orders_cdc.change import ChangeRecord, EventName
from orders_cdc.errors import RetryableError
from orders_cdc.routing import Idempotency, Route
from orders_cdc.settings import Resources
from processors import _order
from processors._batch import raise_failures

log = logging.getLogger(__name__)

TOMBSTONE_SECONDS = 7 * 24 * 3600
_WRITERS = 8  # parallel orders per batch; boto3 clients are thread-safe
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
        "status": order.get("status"),
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


def _put(ddb, table: str, item: dict[str, Any], us: int, seq: str) -> bool:
    """Conditional put; False when the row already holds this or a newer version."""
    try:
        ddb.put_item(
            TableName=table,
            Item={k: marshal(v) for k, v in item.items()},
            ConditionExpression=_CONDITION,
            ExpressionAttributeValues={":us": {"N": str(us)}, ":seq": {"S": seq}},
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            return False
        raise
    return True


def apply(change: ChangeRecord, ddb, table: str) -> int:
    """Write one change's rows; returns how many were stale (skipped)."""
    order_id = _order.order_id(change.new_image or change.old_image, change.keys)
    us, seq = version(change)
    stale = 0
    for product_id, content in writes(change):
        item: dict[str, Any] = {"product_id": product_id, "order_id": order_id}
        if content is None:
            item.update(deleted=True, expires_at=us // 1_000_000 + TOMBSTONE_SECONDS)
        else:
            item.update(content)
        item.update(source_created_us=us, source_sequence=seq)
        if not _put(ddb, table, item, us, seq):
            stale += 1
    return stale


def product_orders(changes: Sequence[ChangeRecord], ctx) -> None:
    ddb = ctx.clients.dynamodb
    table = ctx.settings.resources.product_orders_table
    failures: dict[int, BaseException] = {}
    # One conditional PutItem per row is latency-bound, so orders are written in parallel;
    # one order's changes stay in stream order, and a failure holds back that order's
    # later changes (the staleness guard would reject them anyway once the earlier one lands).
    by_order: dict[str, list[int]] = {}
    for i, change in enumerate(changes):
        by_order.setdefault(change.item_key(), []).append(i)

    def write_order(indices: list[int]) -> None:
        for position, i in enumerate(indices):
            try:
                stale = apply(changes[i], ddb, table)
            except Exception as exc:  # noqa: BLE001 - one change's failure, classified by the pipeline
                failures[i] = exc
                for later in indices[position + 1:]:
                    failures[later] = RetryableError(f"held back: an earlier change of this order failed ({exc!r})")
                return
            if stale:
                # Expected under at-least-once delivery: a duplicate, or a change overtaken.
                log.info("stale change ignored by the view", extra={"item_key": changes[i].item_key(), "stale_rows": stale})

    with ThreadPoolExecutor(max_workers=min(_WRITERS, len(by_order) or 1), thread_name_prefix="views") as pool:
        list(pool.map(write_order, by_order.values()))
    raise_failures(failures)


def routes(resources: Resources) -> list[Route]:
    # Conditional writes with a per-row version: a redelivery is stale against its own rows.
    return [Route("views.product_orders", resources.orders_table, product_orders, idempotency=Idempotency.OFF)]
