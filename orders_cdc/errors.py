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


class DeferredError(RetryableError):
    """Not a failure: the work is held elsewhere (another worker's idempotency lock, an
    open circuit). Try again at `until` (epoch seconds; None: after a backoff) without
    spending one of the record's attempts."""

    def __init__(self, message: str, until: float | None = None):
        super().__init__(message)
        self.until = until


class HandlerTimeout(RetryableError):
    """A handler call outlived its deadline. Retryable, but whether its side effects
    happened is unknown: the abandoned call may still finish (at-least-once)."""


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


_THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException"})


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ("" for anything else)."""
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "") or ""
    return ""


def is_throttling(exc: BaseException) -> bool:
    """The service asks us to slow down: a rate, not a failure of this record or route."""
    return error_code(exc) in _THROTTLING_CODES


def _client_error_is_transient(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return error_code(exc) in _RETRYABLE_CODES or status >= 500 or status == 429


def is_transient(exc: BaseException) -> bool:
    """True for the failures an outage produces (throttling, 5xx, connection errors,
    timeouts, RetryableError): evidence about the downstream, not about the record. The
    circuit breaker holds such a record instead of dead-lettering it while the downstream
    has not shown that it works. An unknown exception is retryable but not transient:
    it may be a bug this record triggers."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, ClientError):
        return _client_error_is_transient(exc)
    return isinstance(exc, (BotoConnectionError, ConnectTimeoutError, ReadTimeoutError, TimeoutError, ConnectionError))


def is_retryable(exc: BaseException) -> bool:
    """True when retrying may succeed. Unknown exceptions count as retryable: the
    attempt bound still sends a persistent bug to the dead-letter queue."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, ClientError):
        return _client_error_is_transient(exc)
    if isinstance(exc, (BotoConnectionError, ConnectTimeoutError, ReadTimeoutError, TimeoutError, OSError)):
        return True
    from orders_cdc.change import DecodeError  # local import: keeps errors.py importable from anywhere

    if isinstance(exc, (DecodeError, ValueError, TypeError)):
        return False
    return True
