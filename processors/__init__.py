"""Order-specific handlers. Each module declares `routes(resources)`; they are merged here.
Route names are unique (the Router refuses duplicates); one change may match several."""

from __future__ import annotations

from orders_cdc.routing import Route
from orders_cdc.settings import Resources
from processors import analytics, audit, inventory, metrics, notification, refunds, views

MODULES = (analytics, audit, views, metrics, inventory, refunds, notification)


def all_routes(resources: Resources) -> list[Route]:
    return [route for module in MODULES for route in module.routes(resources)]
