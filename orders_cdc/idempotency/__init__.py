"""At most one reaction per (route, change): the store, its backends, and the guard that
wraps a route's handler with it."""

from orders_cdc.idempotency.base import IdempotencyRecord, IdempotencyStore, Status
from orders_cdc.idempotency.exceptions import (
    IdempotencyAlreadyCompletedError,
    IdempotencyInProgressError,
    IdempotencyStoreConfigError,
    IdempotencyStoreUnavailableError,
)
from orders_cdc.idempotency.keys import images_digest, item_id, reaction_key

__all__ = [
    "IdempotencyAlreadyCompletedError",
    "IdempotencyInProgressError",
    "IdempotencyRecord",
    "IdempotencyStore",
    "IdempotencyStoreConfigError",
    "IdempotencyStoreUnavailableError",
    "Status",
    "images_digest",
    "item_id",
    "reaction_key",
]
