"""What the idempotency store tells its caller, and what happens next."""

from __future__ import annotations

from orders_cdc.errors import DeferredError, FatalProcessingError, RetryableError


class IdempotencyAlreadyCompletedError(Exception):
    """The reaction was done before: the change is a duplicate for this route."""


class IdempotencyInProgressError(DeferredError):
    """Another worker holds the lock (or a crashed one did and its lease has not expired):
    wait until `until`, then try again. Spends no attempt."""


class IdempotencyStoreUnavailableError(RetryableError):
    """Throttled, 5xx, or unprocessed items that would not go through: try again later."""


class IdempotencyStoreConfigError(FatalProcessingError):
    """The table is missing, access is denied, or a request is invalid: no record can be
    handled safely, so the child exits rather than dead-letter every record."""
