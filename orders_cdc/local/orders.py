"""Demo order histories for the local stack: created -> processing -> shipped ->
delivered, or cancelled on the way. Deterministic for a seed, so tests can replay them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

PRODUCTS = [(f"p-{n:03d}", name, Decimal(price)) for n, (name, price) in enumerate(
    [("Kettle", "39.90"), ("Teapot", "24.50"), ("Mug", "8.99"), ("Tea sampler", "17.25"),
     ("Scale", "29.00"), ("Grinder", "59.95"), ("Filter papers", "4.10"), ("Tin", "12.00"),
     ("Thermometer", "15.75"), ("Cosy", "9.40")], 1)]


def new_order(order_id: str, rng: random.Random, now: datetime | None = None) -> dict:
    now = now or datetime.now(timezone.utc)
    lines = []
    for product_id, name, price in rng.sample(PRODUCTS, rng.randint(1, 4)):
        lines.append({"product_id": product_id, "name": name, "quantity": Decimal(rng.randint(1, 3)), "unit_price": price})
    total = sum((line["quantity"] * line["unit_price"] for line in lines), Decimal("0"))
    customer = rng.randint(1, 500)
    return {
        "order_id": order_id,
        "customer_id": f"c-{customer:04d}",
        "customer_email": f"customer{customer}@example.com",
        "status": "pending",
        "items": lines,
        "total": total,
        "currency": "USD",
        "created_at": now.isoformat(),
        "updated_at": now.isoformat(),
    }


@dataclass
class OrderDemo:
    """Yields (action, item) steps: ("put", item) or ("delete", key)."""

    seed: int = 7
    cancel_rate: float = 0.2
    prefix: str = "o"
    rng: random.Random = field(init=False)
    open: dict[str, dict] = field(default_factory=dict)
    counter: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def step(self) -> tuple[str, dict]:
        # Keep a handful of orders in flight so changes of different orders interleave.
        if len(self.open) < 5 or self.rng.random() < 0.3:
            self.counter += 1
            item = new_order(f"{self.prefix}-{self.counter:06d}", self.rng)
            self.open[item["order_id"]] = item
            return "put", dict(item)
        order_id = self.rng.choice(sorted(self.open))
        item = dict(self.open[order_id])
        status = item["status"]
        now = datetime.now(timezone.utc).isoformat()
        if status in ("pending", "processing") and self.rng.random() < self.cancel_rate:
            item.update(status="cancelled", cancel_reason="customer request", updated_at=now)
        elif status == "pending":
            item.update(status="processing", updated_at=now)
        elif status == "processing":
            item.update(status="shipped", tracking_number=f"1Z{self.rng.randrange(10**10):010d}", updated_at=now)
        elif status == "shipped":
            item.update(status="delivered", updated_at=now)
        if item["status"] in ("delivered", "cancelled"):
            del self.open[order_id]
        else:
            self.open[order_id] = item
        return "put", item
