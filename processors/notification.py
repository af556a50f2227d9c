"""Customer emails through SES: shipped -> a shipping email with the tracking number;
delivered -> a delivery confirmation and, separately, a review request.

One SendEmail call per email (SES has no batch send): the routes are `per_change`, so the
pipeline keeps many sends in flight, never two of one order's on one route. Each email kind
is its own route, so the pipeline retries only the kind that failed: a failed review
request never re-sends the delivery confirmation that already went out.

SES's sending rate is a quota of the account, not an error: `ORDERS_CDC_SES_MAX_SEND_RATE`
gives this worker's share (a token bucket; unset: no limit here), and SES throttling hands
the change back to the pipeline to try again shortly, spending none of its attempts and
leaving the circuit breaker closed.

An order without a usable ``customer_email`` gets no email (logged, not an error: there is
nobody to write to, and retrying cannot change that). SES refusing a message
(MessageRejected, an invalid address) is permanent and dead-letters that change alone.

A send is not idempotent in itself: the pipeline's per-change lock and done-marker
(Idempotency.PER_CHANGE) keep a redelivered change from sending again. The routes fire only
on the status *transition*, so a re-save of a shipped order sends nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from orders_cdc.change import ChangeRecord, EventName
from orders_cdc.errors import DeferredError, error_code, is_throttling
from orders_cdc.logs import record_fields
from orders_cdc.routing import Route, transition
from orders_cdc.settings import Resources
from processors import _order

if TYPE_CHECKING:
    from orders_cdc.app import Context

log = logging.getLogger(__name__)

_MAX_RATE_WAIT = 1.0  # longest a send waits for the rate limit in its call; longer: handed back

_UPSERTS = frozenset({EventName.INSERT, EventName.MODIFY})


@dataclass(frozen=True, slots=True)
class Email:
    to: str
    subject: str
    body: str


def _item_lines(order: Mapping[str, Any], with_quantity: bool = True) -> str:
    out = []
    for line in _order.lines(order).values():
        name = line.name or line.product_id
        out.append(f"  {line.quantity} x {name}" if with_quantity else f"  {name}")
    return "\n".join(out) if out else "  (no items)"


def shipped_email(order: Mapping[str, Any], to: str) -> Email:
    order_id = order["order_id"]
    tracking = order.get("tracking_number")
    tracking_line = f"Tracking number: {tracking}" if tracking else "Tracking number: not available yet"
    total = f"\n\nTotal: {order['total']} {order.get('currency') or ''}".rstrip() if order.get("total") is not None else ""
    body = (
        f"Hello,\n\n"
        f"Good news: your order {order_id} is on its way.\n\n"
        f"{tracking_line}\n\n"
        f"Items:\n{_item_lines(order)}"
        f"{total}\n\n"
        f"Thank you for your order.\n"
    )
    return Email(to, f"Your order {order_id} has shipped", body)


def delivered_email(order: Mapping[str, Any], to: str) -> Email:
    order_id = order["order_id"]
    body = (
        f"Hello,\n\n"
        f"Your order {order_id} has been delivered. We hope you enjoy it.\n\n"
        f"Items:\n{_item_lines(order)}\n\n"
        f"If anything is wrong with your order, just reply to this email.\n"
    )
    return Email(to, f"Your order {order_id} has been delivered", body)


def review_request_email(order: Mapping[str, Any], to: str) -> Email:
    order_id = order["order_id"]
    body = (
        f"Hello,\n\n"
        f"How do you like what you ordered in {order_id}?\n\n"
        f"{_item_lines(order, with_quantity=False)}\n\n"
        f"A short review helps other customers choose. Thank you!\n"
    )
    return Email(to, f"How was your order {order_id}?", body)


def _address(order: Mapping[str, Any]) -> str | None:
    value = order.get("customer_email")
    return value if isinstance(value, str) and "@" in value else None


def _sender(build: Callable[[Mapping[str, Any], str], Email], kind: str):
    route = f"notification.{kind}" + ("" if kind == "review_request" else "_email")

    def handler(change: ChangeRecord, ctx: Context) -> None:
        order = change.new_image or {}
        to = _address(order)
        if to is None:
            log.warning("no email address: %s email not sent", kind,
                        extra=record_fields(change, route=route, outcome="not_sent") | {"kind": kind})
            return
        email = build({**order, "order_id": _order.order_id(order, change.keys)}, to)
        if ctx.ses_rate is not None and (wait := ctx.ses_rate.take(max_wait=_MAX_RATE_WAIT)):
            raise DeferredError("SES sending rate reached", until=time.time() + wait)
        try:
            ctx.clients.ses.send_email(
                Source=ctx.settings.resources.sender_email,
                Destination={"ToAddresses": [email.to]},
                Message={
                    "Subject": {"Data": email.subject, "Charset": "UTF-8"},
                    "Body": {"Text": {"Data": email.body, "Charset": "UTF-8"}},
                },
            )
        except ClientError as exc:
            if is_throttling(exc):  # the account's sending rate: back-pressure, not a failure
                raise DeferredError(f"SES throttled the send ({error_code(exc)})") from exc
            raise

    handler.__name__ = f"send_{kind}"
    return handler


send_shipped = _sender(shipped_email, "shipped")
send_delivered = _sender(delivered_email, "delivered")
send_review_request = _sender(review_request_email, "review_request")


def routes(resources: Resources) -> list[Route]:
    table = resources.orders_table
    shipped, delivered = transition("status", "shipped"), transition("status", "delivered")
    return [
        Route("notification.shipped_email", table, send_shipped, events=_UPSERTS, when=shipped, per_change=True),
        Route("notification.delivered_email", table, send_delivered, events=_UPSERTS, when=delivered, per_change=True),
        Route("notification.review_request", table, send_review_request, events=_UPSERTS, when=delivered,
              per_change=True),
    ]
