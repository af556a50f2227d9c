"""Exceptions that say what happens next.

A handler that fails raises one of these (or lets a library exception through, which
`classify` sorts). The pipeline retries what is retryable, dead-letters what is permanent,
and never acknowledges a record it has neither done nor dead-lettered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum

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


class Stopping(FatalProcessingError):
    """The worker was asked to stop (SIGTERM) and is handed work it will not do: exit
    without acknowledging it. Expected on every stop, so not an error."""


class Failure(StrEnum):
    """What a failure says, and so what happens next (`classify`; see retry.decide)."""

    DEFERRED = "deferred"  # held elsewhere, or back-pressure: wait, spend no attempt
    TRANSIENT = "transient"  # an outage's errors (throttling, 5xx, timeouts, connections): retry
    REFUSED = "refused"  # the route cannot work now, whatever the record: hold the route, never dead-letter
    PERMANENT = "permanent"  # this record is bad: dead-letter it now
    UNKNOWN = "unknown"  # an exception nothing places (maybe a bug this record triggers): retry, bounded


_TRANSIENT_CODES = frozenset(
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
# No record can fix these: the account, the credentials, the permissions or a resource is
# wrong or missing. Dead-lettering on them would empty a healthy stream into the DLQ.
REFUSAL_CODES = frozenset(
    {
        "AccessDenied", "AccessDeniedException", "UnauthorizedOperation",
        "UnrecognizedClientException", "InvalidClientTokenId", "InvalidSignatureException", "SignatureDoesNotMatch",
        "MissingAuthenticationTokenException", "IncompleteSignature", "ExpiredToken", "ExpiredTokenException",
        "RequestExpired", "OptInRequired",
        "ResourceNotFoundException", "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
        "AccountSendingPausedException", "ConfigurationSetSendingPausedException",
        "ConfigurationSetDoesNotExistException", "MailFromDomainNotVerifiedException",
        "KMSAccessDeniedException", "KMSDisabledException", "KMSInvalidStateException", "KMSNotFoundException",
        "InvalidKMSResourceException",
    }
)
_CONNECTION_ERRORS = (BotoConnectionError, ConnectTimeoutError, ReadTimeoutError, TimeoutError, ConnectionError)
_THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException"})


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ("" for anything else)."""
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "") or ""
    return ""


def request_id(exc: BaseException) -> str:
    """The AWS request id of a ClientError, for logs ("" for anything else)."""
    if isinstance(exc, ClientError):
        return exc.response.get("ResponseMetadata", {}).get("RequestId", "") or ""
    return ""


# An email address anywhere in an error's text (SES puts the recipient in MessageRejected and
# verification errors). Logs and dead-letter reasons carry none: the letter's record keeps
# the data, its reason does not repeat it.
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def redact(text: str) -> str:
    return _EMAIL.sub("<email>", text)


def describe(exc: BaseException) -> str:
    """One line for logs and dead-letter reasons, with no customer data: an AWS error as
    operation, code, request id and its message redacted; anything else as its text
    redacted (or its type, when it has none)."""
    if isinstance(exc, ClientError):
        message = redact(exc.response.get("Error", {}).get("Message", "") or "")
        rid = request_id(exc)
        return f"{exc.operation_name}: {error_code(exc)}{f' (request {rid})' if rid else ''}: {message}".rstrip(": ")
    return redact(str(exc)) or type(exc).__name__


def is_throttling(exc: BaseException) -> bool:
    """The service asks us to slow down: a rate, not a failure of this record or route."""
    return error_code(exc) in _THROTTLING_CODES


def classify(exc: BaseException) -> Failure:
    """The one place a failure is sorted: by our exceptions' types, AWS error codes and
    HTTP status, and the connection errors botocore raises."""
    from orders_cdc.change import DecodeError  # local import: keeps errors.py importable from anywhere

    if isinstance(exc, DeferredError):
        return Failure.DEFERRED
    if isinstance(exc, RetryableError):
        return Failure.TRANSIENT
    if isinstance(exc, PermanentError):
        return Failure.PERMANENT
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return Failure.TRANSIENT
        if code in REFUSAL_CODES or status in (401, 403):
            return Failure.REFUSED
        return Failure.PERMANENT  # a 4xx about the request: this record's data
    if isinstance(exc, _CONNECTION_ERRORS):
        return Failure.TRANSIENT
    if isinstance(exc, (DecodeError, ValueError, TypeError)):
        return Failure.PERMANENT
    return Failure.UNKNOWN


def is_transient(exc: BaseException) -> bool:
    """Evidence about the downstream, not about the record (an outage, a refusal, a hold):
    the circuit breaker holds such a record instead of dead-lettering it while the route has
    not shown that it works. An unknown exception is retryable but not transient: it may be
    a bug this record triggers."""
    return classify(exc) in (Failure.DEFERRED, Failure.TRANSIENT, Failure.REFUSED)


def is_retryable(exc: BaseException) -> bool:
    """True when retrying may succeed. Unknown exceptions count as retryable: the attempt
    bound still sends a persistent bug to the dead-letter queue."""
    return classify(exc) is not Failure.PERMANENT
