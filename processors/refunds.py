"""Refunds: a cancelled order -> one refund request on the refunds queue (SQS).

The message (JSON):
``{"order_id", "amount": "88.79" (exact decimal string), "currency", "reason",
"customer_id", "previous_status", "cancelled_at", "dedup_key"}``.
``previous_status`` lets the refund service tell an order that was never charged from one
that was; ``dedup_key`` (order id + the change's creation time in µs) is the same for every
delivery of one cancellation, so the refund service can drop duplicates.

Sent with SendMessageBatch, 10 per call; entries SQS refuses are reported by index
(PartialBatchFailure), the rest are done. On a FIFO queue the dedup key is also the
MessageDeduplicationId (SQS then drops redeliveries within 5 minutes); on a standard queue
this handler is not idempotent, the refund service's dedup is what protects the customer.
An order without a ``total`` cannot be refunded correctly and is dead-lettered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orders_cdc.attrvalue import dumps_exact
from orders_cdc.change import ChangeRecord, EventName
from orders_cdc.errors import PermanentError, RetryableError
from orders_cdc.routing import Route, transition
from orders_cdc.settings import Resources
from orders_cdc.sqs import json_body
from processors import _order
from processors._batch import each, raise_failures

if TYPE_CHECKING:
    from orders_cdc.app import Context

MAX_BATCH = 10  # SendMessageBatch limit
_UPSERTS = frozenset({EventName.INSERT, EventName.MODIFY})


def refund_request(change: ChangeRecord) -> dict[str, Any]:
    order = change.new_image or {}
    order_id = _order.order_id(order, change.keys)
    before = change.old_image if change.event is EventName.MODIFY else None
    return {
        "order_id": order_id,
        "amount": format(_order.total(order), "f"),
        "currency": order.get("currency"),
        "reason": order.get("cancel_reason"),
        "customer_id": order.get("customer_id"),
        "previous_status": _order.status(before),
        "cancelled_at": change.created_at,
        "dedup_key": f"{order_id}:{change.created_us}",
    }


def request_refunds(changes: Sequence[ChangeRecord], ctx: Context) -> None:
    sqs = ctx.clients.sqs
    url = ctx.clients.queue_url(ctx.settings.resources.refund_queue)
    fifo = url.endswith(".fifo")
    failures: dict[int, BaseException] = {}
    requests = each(changes, refund_request, failures)
    indices = list(requests)
    for start in range(0, len(indices), MAX_BATCH):
        chunk = indices[start : start + MAX_BATCH]
        entries = []
        for i in chunk:
            entry = {"Id": str(i), "MessageBody": json_body(dumps_exact(requests[i]))}
            if fifo:
                entry["MessageGroupId"] = requests[i]["order_id"]
                entry["MessageDeduplicationId"] = hashlib.sha256(requests[i]["dedup_key"].encode()).hexdigest()
            entries.append(entry)
        try:
            reply = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        except Exception as exc:  # noqa: BLE001 - fails this chunk only; the pipeline classifies it
            failures.update({i: exc for i in chunk})
            continue
        for failed in reply.get("Failed", []):
            error = PermanentError if failed.get("SenderFault") else RetryableError
            failures[int(failed["Id"])] = error(f"{failed.get('Code')}: {failed.get('Message')}")
    raise_failures(failures)


def routes(resources: Resources) -> list[Route]:
    return [
        Route("refunds.request", resources.orders_table, request_refunds, events=_UPSERTS,
              when=transition("status", "cancelled"), max_batch=MAX_BATCH),
    ]
