"""Atomic counter updates in DynamoDB: ADD deltas to many items in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import ClientError

from orders_cdc.errors import PermanentError, RetryableError

MAX_TRANSACTION_ITEMS = 100  # TransactWriteItems limit
_TOKEN_NAMESPACE = uuid.UUID("8f0c6a52-53a4-4f0e-9d0b-2f3b6f1f2a61")
_serialize = TypeSerializer().serialize
# Reasons a transaction is cancelled that a later attempt can get past.
_RETRYABLE_REASONS = frozenset({"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded", "RequestLimitExceeded"})

Update = tuple[str, Mapping[str, Any], Mapping[str, Decimal]]  # (table, key, {attribute: delta})


def update_action(table: str, key: Mapping[str, Any], deltas: Mapping[str, Decimal]) -> dict[str, Any]:
    names = {f"#a{i}": name for i, name in enumerate(deltas)}
    values = {f":v{i}": _serialize(delta) for i, delta in enumerate(deltas.values())}
    return {
        "TableName": table,
        "Key": {k: _serialize(v) for k, v in key.items()},
        "UpdateExpression": "ADD " + ", ".join(f"#a{i} :v{i}" for i in range(len(deltas))),
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def add_counters(ddb, updates: Sequence[Update], token_seed: str) -> int:
    """ADD each update's deltas, atomically per chunk of 100 items; returns the number of calls.

    ``token_seed`` must name the work uniquely (an event id, the batch's event ids): the
    ClientRequestToken derived from it makes a retry of the same chunk within 10 minutes a
    no-op in DynamoDB, so a chunk that committed before a timeout is not applied twice.
    Keys must be unique within ``updates`` (a transaction may touch an item only once).
    """
    calls = 0
    for n, start in enumerate(range(0, len(updates), MAX_TRANSACTION_ITEMS)):
        chunk = updates[start : start + MAX_TRANSACTION_ITEMS]
        token = str(uuid.uuid5(_TOKEN_NAMESPACE, f"{token_seed}|{n}"))
        try:
            ddb.transact_write_items(
                TransactItems=[{"Update": update_action(*u)} for u in chunk], ClientRequestToken=token
            )
        except ClientError as exc:
            mapped = _classify(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        calls += 1
    return calls


def _classify(exc: ClientError) -> BaseException:
    code = exc.response.get("Error", {}).get("Code")
    if code == "TransactionCanceledException":
        reasons = {r.get("Code") for r in exc.response.get("CancellationReasons", [])} - {"None", None}
        if reasons & _RETRYABLE_REASONS or not reasons:
            return RetryableError(f"transaction cancelled ({', '.join(sorted(reasons)) or 'no reason'})")
        return PermanentError(f"transaction cancelled ({', '.join(sorted(reasons))})")
    if code == "IdempotentParameterMismatchException":
        # Same token, different parameters: the seed does not name the work uniquely. A bug.
        return PermanentError(f"ClientRequestToken reused for different work: {exc}")
    return exc  # the pipeline classifies the rest (throttling, 5xx: retry; validation: dead-letter)
