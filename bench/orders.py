"""Realistic order changes for the benchmarks, deterministic for a seed.

One generator drives everything: ``OrderTraffic.step()`` yields table operations (a put that
is an INSERT or a MODIFY, or a delete that is a REMOVE) with the images before and after, so
B3 can write them to the table and B1/B2 can turn them into the exact KDS-for-DynamoDB
documents (``kds_docs``) and daemon records (``kcl_records``) the processor receives.

The order schema is the local demo's (orders_cdc/local/orders.py) plus attributes that carry
every AttributeValue type: S, N, B (``signature``), BOOL (``gift``), NULL (``notes``), M
(``shipping``, and each line item), L (``items``), SS (``tags``), NS (``warehouse_ids``),
BS (``label_hashes``). 3-10 line items; most changes are 0.6-2 KB of JSON (``size_stats``).

Histories follow the demo: created (pending) -> processing -> shipped -> delivered, or
cancelled on the way; some MODIFYs only edit an order (notes, quantities) without a status
change; finished orders are later removed, a quarter of them by TTL (KDS marks those with
the DynamoDB service identity; B3 cannot do TTL deletes on the local table).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from tests.factories import kcl_record, kds_record, sequence_number

PRODUCTS = [
    (f"p-{n:03d}", name, Decimal(price))
    for n, (name, price) in enumerate(
        [("Kettle", "39.90"), ("Teapot", "24.50"), ("Mug", "8.99"), ("Tea sampler", "17.25"), ("Scale", "29.00"),
         ("Grinder", "59.95"), ("Filter papers", "4.10"), ("Tin", "12.00"), ("Thermometer", "15.75"), ("Cosy", "9.40"),
         ("Matcha whisk", "21.00"), ("Strainer", "6.50"), ("Cups (2)", "18.00"), ("Tray", "27.30"), ("Honey", "11.20"),
         ("Green tea", "13.90"), ("Black tea", "10.90"), ("Oolong", "16.40"), ("Rooibos", "9.80"), ("Chai", "12.60")],
        1,
    )
]
TAGS = ["web", "app", "promo", "b2b", "vip", "repeat", "gift-wrap", "express"]
CITIES = [("Lyon", "FR"), ("Porto", "PT"), ("Leeds", "GB"), ("Ghent", "BE"), ("Turku", "FI"), ("Graz", "AT")]
CANCEL_REASONS = ["customer request", "payment failed", "out of stock"]
# 3-10 line items, most orders small.
ITEM_COUNTS = [3, 4, 5, 6, 7, 8, 9, 10]
ITEM_WEIGHTS = [52, 24, 9, 5, 4, 3, 2, 1]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class Change:
    """One table operation and what it does to the item."""

    event: str  # INSERT | MODIFY | REMOVE
    key: dict[str, Any]
    new: dict[str, Any] | None
    old: dict[str, Any] | None
    ttl: bool = False  # a REMOVE made by DynamoDB's TTL

    @property
    def status_change(self) -> tuple[str | None, str | None]:
        return (self.old or {}).get("status"), (self.new or {}).get("status")


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def new_order(order_id: str, rng: random.Random, now: datetime) -> dict[str, Any]:
    count = rng.choices(ITEM_COUNTS, ITEM_WEIGHTS)[0]
    items = []
    for product_id, name, price in rng.sample(PRODUCTS, count):
        items.append({"product_id": product_id, "name": name, "quantity": Decimal(rng.randint(1, 3)), "unit_price": price})
    customer = rng.randint(1, 5000)
    city, country = rng.choice(CITIES)
    order = {
        "order_id": order_id,
        "customer_id": f"c-{customer:05d}",
        "customer_email": f"c{customer}@example.com",
        "status": "pending",
        "items": items,
        "total": sum((i["quantity"] * i["unit_price"] for i in items), Decimal("0")),
        "currency": "EUR",
        "created_at": _iso(now),
        "updated_at": _iso(now),
        "version": Decimal(1),
        "gift": rng.random() < 0.2,  # BOOL
        "notes": None,  # NULL
        "shipping": {"city": city, "country": country},  # M
    }
    # Not every order carries every attribute; across the traffic every type occurs.
    if rng.random() < 0.7:
        order["tags"] = set(rng.sample(TAGS, rng.randint(1, 2)))  # SS
    if rng.random() < 0.5:
        order["warehouse_ids"] = {Decimal(rng.randint(1, 9)) for _ in range(rng.randint(1, 2))}  # NS
    if rng.random() < 0.5:
        order["signature"] = rng.randbytes(9)  # B
    if rng.random() < 0.3:
        order["label_hashes"] = {rng.randbytes(3)}  # BS
    return order


@dataclass
class OrderTraffic:
    """A steady mix of order changes: about 25% INSERT, 65% MODIFY, 10% REMOVE."""

    seed: int = 5
    prefix: str = "o"
    in_flight: int = 60  # open orders whose changes interleave
    clock: datetime | None = None  # simulated time for B1/B2 documents; None = real time (B3)
    rng: random.Random = field(init=False)
    open: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: list[dict[str, Any]] = field(default_factory=list)
    counter: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _now(self) -> datetime:
        if self.clock is None:
            return datetime.now(timezone.utc)
        self.clock += timedelta(microseconds=self.rng.randint(200, 900))
        return self.clock

    def step(self) -> Change:
        rng = self.rng
        roll = rng.random()
        if len(self.open) < self.in_flight // 2 or roll < 0.25:
            self.counter += 1
            item = new_order(f"{self.prefix}-{self.counter:07d}", rng, self._now())
            self.open[item["order_id"]] = item
            return Change("INSERT", {"order_id": item["order_id"]}, item, None)
        if self.finished and roll < 0.35:
            old = self.finished.pop(rng.randrange(len(self.finished)))
            return Change("REMOVE", {"order_id": old["order_id"]}, None, old, ttl=rng.random() < 0.25)
        order_id = rng.choice(list(self.open))
        old = self.open[order_id]
        new = dict(old)
        now = _iso(self._now())
        new.update(updated_at=now, version=old["version"] + 1)
        status = old["status"]
        if rng.random() < 0.3:
            # An edit without a status change: a note, or one quantity changed.
            if rng.random() < 0.5:
                new["notes"] = rng.choice(["leave at the door", "call first", None])
            else:
                items = [dict(i) for i in old["items"]]
                i = rng.randrange(len(items))
                items[i]["quantity"] = Decimal(rng.randint(1, 4))
                new["items"] = items
                new["total"] = sum((i["quantity"] * i["unit_price"] for i in items), Decimal("0"))
        elif status in ("pending", "processing") and rng.random() < 0.15:
            new.update(status="cancelled", cancel_reason=rng.choice(CANCEL_REASONS))
        elif status == "pending":
            new["status"] = "processing"
        elif status == "processing":
            new.update(status="shipped", tracking_number=f"1Z{rng.randrange(10**10):010d}")
        elif status == "shipped":
            new["status"] = "delivered"
        if new["status"] in ("delivered", "cancelled"):
            del self.open[order_id]
            self.finished.append(new)
            if len(self.finished) > 500:
                self.finished.pop(0)
        else:
            self.open[order_id] = new
        return Change("MODIFY", {"order_id": order_id}, new, old)

    def changes(self, n: int) -> Iterator[Change]:
        for _ in range(n):
            yield self.step()


START = datetime(2026, 11, 28, 9, 0, tzinfo=timezone.utc)


def kds_docs(n: int, seed: int = 5, table: str = "Orders") -> list[dict[str, Any]]:
    """n KDS-for-DynamoDB change documents (the JSON inside each Kinesis record)."""
    traffic = OrderTraffic(seed=seed, clock=START)
    docs = []
    for change in traffic.changes(n):
        when = traffic.clock or START
        created_us = (when - EPOCH) // timedelta(microseconds=1)
        docs.append(
            kds_record(change.event, new=change.new, old=change.old, keys=change.key, created_us=created_us,
                       table=table, ttl=change.ttl)
        )
    return docs


def kcl_records(docs: list[dict[str, Any]], first_sequence: int = 1) -> list[dict[str, Any]]:
    """The daemon's processRecords entries for docs, with consecutive sequence numbers."""
    return [kcl_record(doc, sequence_number(first_sequence + i)) for i, doc in enumerate(docs)]


def attribute_types(docs: list[dict[str, Any]]) -> set[str]:
    """Every AttributeValue type tag that occurs in the documents' images."""
    found: set[str] = set()

    def walk(av: Any) -> None:
        ((tag, value),) = av.items()
        found.add(tag)
        if tag == "M":
            for inner in value.values():
                walk(inner)
        elif tag == "L":
            for inner in value:
                walk(inner)

    for doc in docs:
        for image in ("NewImage", "OldImage", "Keys"):
            for av in doc["dynamodb"].get(image, {}).values():
                walk(av)
    return found
