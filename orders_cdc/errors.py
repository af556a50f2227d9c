"""Exceptions that say what happens next.

A handler that fails raises one of these (or lets a library exception through, which
`classify` sorts). The pipeline retries what is retryable, dead-letters what is permanent,
and never acknowledges a record it has neither done nor dead-lettered.
"""

from __future__ import annotations

from collections.abc import Mapping

from botocore.exceptions import (
    ClientError,
    ConnectionError as BotoConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
)


class SettingsError(Exception):
    """A bad or missing setting: the process stops at start with this one line."""


class RetryableError(Exception):
    """Try again later: throttling, an outage, a timeout."""


class PermanentError(Exception):
    """Retrying cannot help (bad data, a validation error): dead-letter the record now."""


class PartialBatchFailure(Exception):
    """Raised by a batch handler when only some of its changes failed.

    `failures` maps the index of a failed change (in the list the handler was given)
    to its exception; the other changes are done.
    """

    def __init__(self, failures: Mapping[int, BaseException]):
        super().__init__(f"{len(failures)} change(s) failed")
        self.failures = dict(failures)


class FatalProcessingError(Exception):
    """A record is neither done nor dead-lettered and cannot be: the child must exit
    without acknowledging, so the worker restarts from the last checkpoint."""


_RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "InternalServerError",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "TransactionInProgressException",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


def is_retryable(exc: BaseException) -> bool:
    """True when retrying may succeed. Unknown exceptions count as retryable: the
    attempt bound still sends a persistent bug to the dead-letter queue."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _RETRYABLE_CODES or status >= 500 or status == 429
    if isinstance(exc, (BotoConnectionError, ConnectTimeoutError, ReadTimeoutError, TimeoutError, OSError)):
        return True
    from orders_cdc.change import DecodeError  # local import: keeps errors.py importable from anywhere

    if isinstance(exc, (DecodeError, ValueError, TypeError)):
        return False
    return True
