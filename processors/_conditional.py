"""Version-conditioned puts in TransactWriteItems, shared by the ProductOrders view and the
Orders replica.

Each put carries its own condition ("this version is newer than the stored one"). They go
100 to a transaction (and under its 4 MB), each with its condition; a transaction is
cancelled when any condition fails, and CancellationReasons say which: those puts are stale
(a redelivery or an overtaken change, not an error) and the transaction is sent again
without them. A request DynamoDB refuses as a whole (ValidationException) is retried put by
put, so that one bad item fails only the changes that wrote it. A lone put is a plain
conditional PutItem: half a transaction's write capacity.

A put's failure is reported for every change whose write it carries (`writers`, indices in
the handler's call); the pipeline retries or dead-letters them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from orders_cdc.counters import MAX_TRANSACTION_ITEMS
from orders_cdc.errors import error_code

# TransactWriteItems refuses more than 4 MB of items; `size` is an upper estimate of a put's
# item, so a chunk under this budget is never refused for its size.
MAX_TRANSACTION_BYTES = 4_000_000


@dataclass(eq=False, slots=True)
class ConditionalPut:
    request: dict[str, Any]  # PutItem's arguments: TableName, Item, ConditionExpression, ...
    writers: list[int]  # the changes (indices in the handler's call) whose write this is
    size: int = 0  # upper estimate of the item's bytes (0: small)


def put_all(ddb, puts: Sequence[ConditionalPut], failures: dict[int, BaseException]) -> int:
    """Write every put; returns how many were stale. Failures go to ``failures`` by writer."""
    return sum(_transact(ddb, chunk, failures) for chunk in _chunks(puts))


def _chunks(puts: Sequence[ConditionalPut]) -> Iterator[list[ConditionalPut]]:
    chunk: list[ConditionalPut] = []
    size = 0
    for put in puts:
        if chunk and (len(chunk) == MAX_TRANSACTION_ITEMS or size + put.size > MAX_TRANSACTION_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(put)
        size += put.size
    if chunk:
        yield chunk


def _put_one(ddb, put: ConditionalPut) -> bool:
    """Conditional PutItem; False when the item already holds this or a newer version."""
    try:
        ddb.put_item(**put.request)
    except ClientError as exc:
        if error_code(exc) == "ConditionalCheckFailedException":
            return False
        raise
    return True


def _transact(ddb, puts: list[ConditionalPut], failures: dict[int, BaseException]) -> int:
    """Write `puts` (at most 100, under 4 MB) in transactions; returns how many were stale."""
    stale = 0
    while puts:
        if len(puts) == 1:
            return stale + _one_by_one(ddb, puts, failures)
        try:
            ddb.transact_write_items(TransactItems=[{"Put": p.request} for p in puts])
            return stale
        except ClientError as exc:
            code = error_code(exc)
            reasons = [r.get("Code") for r in exc.response.get("CancellationReasons") or []]
            if code == "ValidationException" or (code == "TransactionCanceledException" and len(reasons) == len(puts)
                                                 and "ValidationError" in reasons):
                return stale + _one_by_one(ddb, puts, failures)
            if code != "TransactionCanceledException" or len(reasons) != len(puts) or any(
                    r not in (None, "None", "ConditionalCheckFailed") for r in reasons):
                _fail(puts, exc, failures)
                return stale
            stale += reasons.count("ConditionalCheckFailed")
            puts = [p for p, r in zip(puts, reasons) if r != "ConditionalCheckFailed"]
        except Exception as exc:  # noqa: BLE001 - fails the changes whose puts were in it
            _fail(puts, exc, failures)
            return stale
    return stale


def _one_by_one(ddb, puts: list[ConditionalPut], failures: dict[int, BaseException]) -> int:
    stale = 0
    for put in puts:
        try:
            stale += not _put_one(ddb, put)
        except Exception as exc:  # noqa: BLE001 - this put's changes only
            _fail([put], exc, failures)
    return stale


def _fail(puts: list[ConditionalPut], exc: BaseException, failures: dict[int, BaseException]) -> None:
    for put in puts:
        for i in put.writers:
            failures.setdefault(i, exc)
