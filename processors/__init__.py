"""Order-specific handlers. Each module declares `routes(resources)`; they are merged here.
Route names are unique (the Router refuses duplicates); one change may match several."""

from __future__ import annotations

from orders_cdc.routing import Route
from orders_cdc.settings import Resources
from processors import analytics, audit, inventory, metrics, notification, refunds, replication, views

MODULES = (analytics, audit, views, metrics, inventory, refunds, notification, replication)


def all_routes(resources: Resources, *, replica_ttl_deletes: bool = True) -> list[Route]:
    """Every route. `replica_ttl_deletes` is ORDERS_CDC_REPLICA_TTL_DELETES (build_pipeline
    passes the setting; the default is the setting's)."""
    routes = [route for module in MODULES if module is not replication for route in module.routes(resources)]
    return routes + replication.routes(resources, ttl_deletes=replica_ttl_deletes)
