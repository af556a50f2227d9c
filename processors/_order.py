"""Reading the order schema (orders_cdc/local/orders.py) out of a change's images.

Shared by the handlers that need line items, amounts and the order's day. Bad order data
raises OrderDataError: retrying the same image cannot help, so the pipeline dead-letters it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

# DynamoDB numbers hold 38 digits; Python's default context (28) would round money silently.
from orders_cdc.counters import EXACT as _EXACT
from orders_cdc.errors import PermanentError

STATUSES = ("pending", "processing", "shipped", "delivered", "cancelled")
OPEN = frozenset({"pending", "processing"})  # stock is reserved, nothing has left yet


class OrderDataError(PermanentError, ValueError):
    """An order image that does not fit the schema."""


@dataclass(frozen=True, slots=True)
class ProductLine:
    """All of one product's lines in one order (an order may list a product twice)."""

    product_id: str
    name: str | None
    quantity: Decimal
    amount: Decimal  # sum of quantity * unit_price over the lines
    unit_price: Decimal | None  # None when the lines disagree on the price


def exact_add(a: Decimal, b: Decimal) -> Decimal:
    try:
        return _EXACT.add(a, b)
    except ArithmeticError as exc:
        raise OrderDataError(f"{a} + {b} is not exact in 38 digits") from exc


def exact_mul(a: Decimal, b: Decimal) -> Decimal:
    try:
        return _EXACT.multiply(a, b)
    except ArithmeticError as exc:
        raise OrderDataError(f"{a} * {b} is not exact in 38 digits") from exc


def order_id(image: Mapping[str, Any] | None, keys: Mapping[str, Any]) -> str:
    value = (image or {}).get("order_id", keys.get("order_id"))
    if not isinstance(value, str) or not value:
        raise OrderDataError(f"order_id must be a non-empty string, got {value!r}")
    return value


def lines(image: Mapping[str, Any] | None) -> dict[str, ProductLine]:
    """product_id -> the product's lines, in the order of first appearance. No items: {}."""
    if image is None:
        return {}
    items = image.get("items")
    if items is None:
        return {}
    if not isinstance(items, list):
        raise OrderDataError(f"items must be a list, got {type(items).__name__}")
    found: dict[str, ProductLine] = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise OrderDataError(f"items[{i}] must be a map, got {type(item).__name__}")
        product_id = item.get("product_id")
        if not isinstance(product_id, str) or not product_id:
            raise OrderDataError(f"items[{i}].product_id must be a non-empty string, got {product_id!r}")
        quantity = _number(item.get("quantity"), f"items[{i}].quantity")
        price = _number(item.get("unit_price"), f"items[{i}].unit_price")
        name = item.get("name") if isinstance(item.get("name"), str) else None
        amount = exact_mul(quantity, price)
        seen = found.get(product_id)
        if seen is None:
            found[product_id] = ProductLine(product_id, name, quantity, amount, price)
        else:
            found[product_id] = ProductLine(
                product_id,
                seen.name or name,
                exact_add(seen.quantity, quantity),
                exact_add(seen.amount, amount),
                seen.unit_price if seen.unit_price == price else None,
            )
    return found


def total(image: Mapping[str, Any]) -> Decimal:
    return _number(image.get("total"), "total")


def day(image: Mapping[str, Any]) -> date | None:
    """The UTC date of the order's created_at; None when the image has none."""
    raw = image.get("created_at")
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise OrderDataError(f"created_at must be an ISO-8601 string, got {type(raw).__name__}")
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise OrderDataError(f"created_at {raw!r} is not an ISO-8601 time") from None
    if when.tzinfo is None:  # the schema writes UTC; a naive time is read as UTC
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).date()


def status(image: Mapping[str, Any] | None) -> str | None:
    return None if image is None else image.get("status")


def _number(value: Any, where: str) -> Decimal:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise OrderDataError(f"{where} must be a number, got {value!r}")
    return value
