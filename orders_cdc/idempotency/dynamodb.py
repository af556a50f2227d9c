"""The idempotency store in DynamoDB (table key `id` S, TTL on `expires_at`).

- A lock is a conditional put; a round's locks go 100 to a TransactWriteItems (a lone one
  is a PutItem). `ReturnValuesOnConditionCheckFailure=ALL_OLD` returns the record in the
  way, which saves a second read; a transaction cancelled only by such records is sent
  again without them.
- Reads are BatchGetItem, 100 keys a call, strongly consistent.
- COMPLETED markers are BatchWriteItem, 25 a call; lock releases are conditional on the
  lock still being ours (TransactWriteItems, 100 a call).
- ATOMIC routes' markers go in the same TransactWriteItems as their counter updates, each
  a Put conditional on no unexpired record; CancellationReasons (one per item, in order)
  say which markers were already there.
- ClientError codes become domain exceptions here, where AWS is called.

The batch helpers are shared with the high-water-mark store (same table).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError

from orders_cdc.counters import MAX_TRANSACTION_ITEMS, CounterUpdate, transaction_error, update_action
from orders_cdc.errors import Failure, classify, error_code, is_retryable
from orders_cdc.idempotency.base import IdempotencyRecord, IdempotencyStore, Status
from orders_cdc.idempotency.exceptions import IdempotencyStoreConfigError, IdempotencyStoreUnavailableError

MAX_GET = 100  # BatchGetItem
MAX_WRITE = 25  # BatchWriteItem
_UNPROCESSED_ATTEMPTS = 5
_ABSENT = "attribute_not_exists(#id) OR expires_at < :now"
_FREE = (
    "attribute_not_exists(#id) OR expires_at < :now"
    " OR (#status = :inprogress AND (lock_until <= :now OR #owner = :owner))"
)


def _misconfigured(exc: ClientError) -> bool:
    """The table, the credentials or our own request is wrong: nothing about one record can
    fix it, and without the store no record can be handled safely."""
    return classify(exc) is Failure.REFUSED or error_code(exc) == "ValidationException"


def mapped(exc: ClientError, what: str) -> Exception:
    code = error_code(exc)
    if _misconfigured(exc):
        return IdempotencyStoreConfigError(f"{what}: {code}: {exc}")
    if is_retryable(exc):
        return IdempotencyStoreUnavailableError(f"{what}: {code}")
    return IdempotencyStoreUnavailableError(f"{what}: unexpected {code}: {exc}")


def batch_get(ddb, table: str, ids: Sequence[str], sleep: Callable[[float], None]) -> dict[str, dict[str, Any]]:
    """{id: raw item} for the ids that exist; one call per 100 ids (plus unprocessed retries)."""
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), MAX_GET):
        request = {table: {"Keys": [{"id": {"S": i}} for i in ids[start : start + MAX_GET]], "ConsistentRead": True}}
        for attempt in range(_UNPROCESSED_ATTEMPTS):
            try:
                reply = ddb.batch_get_item(RequestItems=request)
            except ClientError as exc:
                raise mapped(exc, "BatchGetItem") from exc
            for item in reply.get("Responses", {}).get(table, []):
                found[item["id"]["S"]] = item
            request = reply.get("UnprocessedKeys") or {}
            if not request:
                break
            sleep(0.05 * 2**attempt)
        else:
            raise IdempotencyStoreUnavailableError("BatchGetItem: keys still unprocessed")
    return found


def batch_write(ddb, table: str, requests: Sequence[dict[str, Any]], sleep: Callable[[float], None]) -> None:
    """Every PutRequest/DeleteRequest durable, or raise; 25 per call."""
    for start in range(0, len(requests), MAX_WRITE):
        pending: list[dict[str, Any]] = list(requests[start : start + MAX_WRITE])
        for attempt in range(_UNPROCESSED_ATTEMPTS):
            try:
                reply = ddb.batch_write_item(RequestItems={table: pending})
            except ClientError as exc:
                raise mapped(exc, "BatchWriteItem") from exc
            pending = reply.get("UnprocessedItems", {}).get(table, [])
            if not pending:
                break
            sleep(0.05 * 2**attempt)
        else:
            raise IdempotencyStoreUnavailableError(f"BatchWriteItem: {len(pending)} item(s) still unprocessed")


class DynamoDbIdempotencyStore(IdempotencyStore):
    def __init__(self, ddb, table: str, sleep: Callable[[float], None] = time.sleep, **kwargs):
        super().__init__(**kwargs)
        self._ddb = ddb
        self.table = table
        self._sleep = sleep

    def _get_many(self, keys: Sequence[str]) -> Mapping[str, IdempotencyRecord]:
        return {k: _record(item) for k, item in batch_get(self._ddb, self.table, keys, self._sleep).items()}

    def _put_if_free(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        try:
            self._ddb.put_item(
                TableName=self.table,
                Item=_item(record),
                ConditionExpression=_FREE,
                ExpressionAttributeNames={"#id": "id", "#status": "status", "#owner": "owner"},
                ExpressionAttributeValues={
                    ":now": {"N": repr(now)}, ":inprogress": {"S": Status.INPROGRESS.value}, ":owner": {"S": record.owner},
                },
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise mapped(exc, "PutItem") from exc
            item = exc.response.get("Item") or self._get_one(record.key)
            # Deleted in between: report it as a lock that is free now (try again at once).
            return _record(item) if item else IdempotencyRecord(record.key, Status.INPROGRESS, 0, now, "")
        return None

    def _put_many_if_free(self, records: Sequence[IdempotencyRecord], now: float) -> Mapping[str, IdempotencyRecord]:
        """The locks of a round, 100 conditional puts per TransactWriteItems (one lock: a PutItem)."""
        if len(records) == 1:
            existing = self._put_if_free(records[0], now)
            return {} if existing is None else {records[0].key: existing}
        refused = self._conditional_writes([r.key for r in records], [
            {"Put": {"TableName": self.table, "Item": _item(r), "ConditionExpression": _FREE,
                     "ExpressionAttributeNames": {"#id": "id", "#status": "status", "#owner": "owner"},
                     "ExpressionAttributeValues": {":now": {"N": repr(now)}, ":inprogress": {"S": Status.INPROGRESS.value},
                                                   ":owner": {"S": r.owner}},
                     "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}} for r in records])
        in_the_way = {}
        for key, reason in refused.items():
            item = reason.get("Item") or self._get_one(key)
            # Deleted in between: a lock that is free now (the next round takes it).
            in_the_way[key] = _record(item) if item else IdempotencyRecord(key, Status.INPROGRESS, 0, now, "")
        return in_the_way

    def _conditional_writes(self, keys: Sequence[str], actions: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """`actions` (one conditional write per key) in TransactWriteItems of 100. A
        transaction cancelled only by conditions that failed is sent again without those
        actions. Returns {key: its CancellationReason} for the actions whose condition failed."""
        refused: dict[str, dict[str, Any]] = {}
        for start in range(0, len(actions), MAX_TRANSACTION_ITEMS):
            pending = list(zip(keys[start : start + MAX_TRANSACTION_ITEMS], actions[start : start + MAX_TRANSACTION_ITEMS]))
            while pending:
                try:
                    self._ddb.transact_write_items(TransactItems=[action for _, action in pending])
                    break
                except ClientError as exc:
                    reasons = exc.response.get("CancellationReasons") or []
                    if (error_code(exc) != "TransactionCanceledException" or len(reasons) != len(pending)
                            or any(r.get("Code") not in (None, "None", "ConditionalCheckFailed") for r in reasons)):
                        if _misconfigured(exc):
                            raise mapped(exc, "TransactWriteItems") from exc
                        raise transaction_error(exc) from exc
                    failed = {key: r for (key, _), r in zip(pending, reasons) if r.get("Code") == "ConditionalCheckFailed"}
                    refused.update(failed)
                    pending = [(key, action) for key, action in pending if key not in failed]
        return refused

    def _get_one(self, key: str) -> dict[str, Any] | None:
        try:
            return self._ddb.get_item(TableName=self.table, Key={"id": {"S": key}}, ConsistentRead=True).get("Item")
        except ClientError as exc:
            raise mapped(exc, "GetItem") from exc

    def _put_many(self, records: Sequence[IdempotencyRecord]) -> None:
        batch_write(self._ddb, self.table, [{"PutRequest": {"Item": _item(r)}} for r in records], self._sleep)

    def _delete_many(self, keys: Sequence[str]) -> None:
        # Only our own lock: released late (after its lease), it may be another worker's by
        # now, and deleting that would let a third one in. BatchWriteItem has no conditions.
        self._conditional_writes(keys, [
            {"Delete": {"TableName": self.table, "Key": {"id": {"S": k}},
                        "ConditionExpression": "#owner = :owner AND #status = :inprogress",
                        "ExpressionAttributeNames": {"#owner": "owner", "#status": "status"},
                        "ExpressionAttributeValues": {":owner": {"S": self.owner},
                                                      ":inprogress": {"S": Status.INPROGRESS.value}}}} for k in keys])

    def _transact(self, markers: Sequence[IdempotencyRecord], updates: Sequence[CounterUpdate], now: float) -> set[str]:
        items = [{"Update": update_action(u)} for u in updates] + [
            {"Put": {"TableName": self.table, "Item": _item(m), "ConditionExpression": _ABSENT,
                     "ExpressionAttributeNames": {"#id": "id"}, "ExpressionAttributeValues": {":now": {"N": repr(now)}}}}
            for m in markers
        ]
        try:
            self._ddb.transact_write_items(TransactItems=items)
        except ClientError as exc:
            existing = _markers_in_the_way(exc, markers, len(updates))
            if existing:
                return existing
            if classify(exc) is Failure.REFUSED:  # a bad number in one change (ValidationException) is not fatal
                raise mapped(exc, "TransactWriteItems") from exc
            raise transaction_error(exc) from exc
        return set()


def _markers_in_the_way(exc: ClientError, markers: Sequence[IdempotencyRecord], n_updates: int) -> set[str]:
    """The keys of the markers that cancelled the transaction, if nothing else did."""
    if error_code(exc) != "TransactionCanceledException":
        return set()
    reasons = [r.get("Code") for r in exc.response.get("CancellationReasons", [])]
    if len(reasons) != n_updates + len(markers) or any(r not in (None, "None") for r in reasons[:n_updates]):
        return set()
    if any(r not in (None, "None", "ConditionalCheckFailed") for r in reasons[n_updates:]):
        return set()
    return {m.key for m, r in zip(markers, reasons[n_updates:]) if r == "ConditionalCheckFailed"}


def _item(record: IdempotencyRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": {"S": record.key},
        "status": {"S": record.status.value},
        "expires_at": {"N": str(record.expires_at)},
    }
    if record.status is Status.INPROGRESS:
        item["lock_until"] = {"N": repr(record.lock_until)}
        item["owner"] = {"S": record.owner}
    return item


def _record(item: Mapping[str, Any]) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=item["id"]["S"],
        status=Status(item["status"]["S"]),
        expires_at=int(item["expires_at"]["N"]),
        lock_until=float(item.get("lock_until", {}).get("N", 0)),
        owner=item.get("owner", {}).get("S", ""),
    )
