"""Order-specific handlers. Each module declares `routes(resources)`; they are merged here."""

from __future__ import annotations

from orders_cdc.routing import Route
from orders_cdc.settings import Resources
from processors import analytics


def all_routes(resources: Resources) -> list[Route]:
    return [*analytics.routes(resources)]
