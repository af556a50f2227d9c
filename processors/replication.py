"""The Orders replica: a current-state copy of every order in a second DynamoDB table
(ORDERS_CDC_REPLICA_TABLE, reached through its own client: region and endpoint of its own).

A replica item is the order as the table holds it (the change's NewImage, every attribute,
exact) plus its version; the replica table has the orders table's key. Which change is
newest: the Orders items carry no version of their own, so the version is the change's,
the same as the view's (processors/views.py ``version``): its ApproximateCreationDateTime
in µs (MICROSECOND precision in the deployed table), then its padded Kinesis sequence
number for changes in the same microsecond (millisecond-precision streams). Every write is
a conditional put::

    attribute_not_exists(replica_version_us) OR replica_version_us < :us
    OR (replica_version_us = :us AND replica_version_seq < :seq)

so a duplicated or overtaken change is stale (ConditionalCheckFailed, not an error) and the
copy never moves back. The condition names the version, not the key: an item put there by
something else (no version) is overwritten by the first change, never kept forever.

A REMOVE does not delete the copy; it replaces it with a tombstone (the key, ``replica_deleted:
true``, the REMOVE's version, and ``replica_expires_at`` for the replica table's TTL). A real
delete, however conditioned, would forget the version: an older INSERT or MODIFY of the
order arriving after it (reordered, duplicated, or replayed) would find no item and bring
the order back. The tombstone lives for ORDERS_CDC_IDEMPOTENCY_TTL_SECONDS past the REMOVE,
which `run` refuses to start below the stream's retention: any older change of the order is
out of the stream before its tombstone can go. Readers skip tombstones
(``attribute_not_exists(replica_deleted)``).

TTL expiries (REMOVEs by the DynamoDB service) are replicated unless
ORDERS_CDC_REPLICA_TTL_DELETES=false: a current-state copy holds what the table holds. With
it off they are not routed here at all (the copy keeps the expired order's last state).

Within a handler call each order's changes collapse to the newest (one put per order); the
puts go 100 to a TransactWriteItems and under its 4 MB (processors/_conditional.py), stale
ones dropped and the rest sent again. Only PutItem is used, so the replica needs
dynamodb:PutItem (and DescribeTable for the preflight), never DeleteItem. Naturally
idempotent (Idempotency.OFF): a redelivered change is stale against its own copy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orders_cdc.attrvalue import marshal, request_map
from orders_cdc.change import ChangeRecord, EventName
from orders_cdc.routing import Idempotency, Route
from orders_cdc.settings import Resources
from processors._batch import raise_failures
from processors._conditional import ConditionalPut, put_all
from processors._order import OrderDataError
from processors.metrics import not_ttl_delete
from processors.views import version

if TYPE_CHECKING:
    from orders_cdc.app import Context

log = logging.getLogger(__name__)

VERSION_US = "replica_version_us"
VERSION_SEQ = "replica_version_seq"
DELETED = "replica_deleted"
EXPIRES_AT = "replica_expires_at"  # the replica table's TTL attribute; only tombstones carry it
RESERVED = frozenset({VERSION_US, VERSION_SEQ, DELETED, EXPIRES_AT})
MAX_BATCH = 100  # changes per call: at most 100 puts, one transaction

_CONDITION = (
    f"attribute_not_exists({VERSION_US}) OR {VERSION_US} < :us"
    f" OR ({VERSION_US} = :us AND {VERSION_SEQ} < :seq)"
)
_OVERHEAD = 512  # bytes a put adds to its item's estimate: the version attributes, the condition


def replica_item(change: ChangeRecord, tombstone_seconds: int) -> dict[str, Any]:
    """The replica item this change leaves, as AttributeValues: the order (its NewImage as it
    came, B and BS as bytes) with its version, or, for a REMOVE, a tombstone."""
    us, seq = version(change)
    if change.event is EventName.REMOVE:
        plain: dict[str, Any] = {**change.keys, DELETED: True, EXPIRES_AT: us // 1_000_000 + tombstone_seconds}
        item = {k: marshal(v) for k, v in plain.items()}
    else:
        if change.new_image is None:  # decodes (and so checks) the image once per change, cached
            raise OrderDataError(f"{change.event.value} without a NewImage: the stream must carry new images")
        clash = RESERVED.intersection(change.new_av)
        if clash:
            raise OrderDataError(f"the order has attribute(s) {sorted(clash)}, which the replica keeps for itself")
        item = {**request_map(change.new_av), **{k: marshal(v) for k, v in change.keys.items()}}
    item[VERSION_US], item[VERSION_SEQ] = {"N": str(us)}, {"S": seq}
    return item


def _put(table: str, change: ChangeRecord, tombstone_seconds: int) -> tuple[tuple[int, str], dict[str, Any]]:
    us, seq = version(change)
    request = {
        "TableName": table,
        "Item": replica_item(change, tombstone_seconds),
        "ConditionExpression": _CONDITION,
        "ExpressionAttributeValues": {":us": {"N": str(us)}, ":seq": {"S": seq}},
    }
    return (us, seq), request


def orders_replica(changes: Sequence[ChangeRecord], ctx: Context) -> None:
    table = ctx.settings.resources.replica_table
    tombstone_seconds = ctx.settings.idempotency_ttl_seconds
    failures: dict[int, BaseException] = {}
    newest: dict[str, tuple[tuple[int, str], ConditionalPut]] = {}  # item key -> (version, its put)
    for i, change in enumerate(changes):
        try:
            ver, request = _put(table, change, tombstone_seconds)
        except Exception as exc:  # noqa: BLE001 - a change with bad data fails alone
            failures[i] = exc
            continue
        key = change.item_key()
        # By version, not by position: a reordered batch may hold the newest change first.
        # An order's older changes ride on its newest put: done when it is (or is stale).
        earlier = newest.get(key)
        if earlier is None:
            newest[key] = ver, ConditionalPut(request, [i], len(change.raw) + _OVERHEAD)
        elif ver > earlier[0]:
            newest[key] = ver, ConditionalPut(request, earlier[1].writers + [i], len(change.raw) + _OVERHEAD)
        else:
            earlier[1].writers.append(i)
    stale = put_all(ctx.clients.replica, [put for _, put in newest.values()], failures)
    if stale:
        # Expected under at-least-once delivery: a duplicate, or a change overtaken.
        log.info("stale changes ignored by the replica", extra={"stale_orders": stale})
    raise_failures(failures)


def routes(resources: Resources, ttl_deletes: bool = True) -> list[Route]:
    # Version-conditioned puts: a redelivered change is stale against its own copy.
    return [Route("replication.orders_replica", resources.orders_table, orders_replica,
                  when=None if ttl_deletes else not_ttl_delete, idempotency=Idempotency.OFF, max_batch=MAX_BATCH)]
