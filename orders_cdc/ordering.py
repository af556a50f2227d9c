"""Per-item high-water marks: apply a change to derived state only if it is newer.

KDS-for-DynamoDB may deliver an item's changes out of order and more than once. AWS's
advice: order them by ApproximateCreationDateTime and treat an equal timestamp with
identical images as a duplicate. A change's *version* is one sortable string,

    <created_us, 20 digits>#<sha256 of the images>

so "newer" is plain string order: by creation time, then (a deterministic tie-break for
changes in the same microsecond, common at MILLISECOND precision) by the images' hash.
The hash, unlike a sequence number, is the same for every copy of a change, so a late
duplicate can never win a tie. Equal versions = the same change = DUPLICATE; a lower one
= STALE. The mark only moves up: a conditional UpdateItem,
`attribute_not_exists(hwm) OR hwm < :v`.

One mark per (route, item): an ordered route's progress is its own.
"""

from __future__ import annotations

import hashlib
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum

from botocore.exceptions import ClientError

from orders_cdc.change import ChangeRecord
from orders_cdc.idempotency.dynamodb import batch_get, mapped
from orders_cdc.idempotency.keys import item_id


class Verdict(StrEnum):
    NEWER = "newer"
    DUPLICATE = "duplicate"
    STALE = "stale"


def version(change: ChangeRecord, digest: str) -> str:
    return f"{change.created_us:020d}#{digest}"


def mark_key(route: str, change: ChangeRecord) -> str:
    return f"hwm#{route}#{hashlib.sha256(item_id(change).encode()).hexdigest()}"


def compare(candidate: str, mark: str | None) -> Verdict:
    if mark is None or candidate > mark:
        return Verdict.NEWER
    return Verdict.DUPLICATE if candidate == mark else Verdict.STALE


class HighWaterMarkStore(ABC):
    def __init__(self, ttl_seconds: int = 7 * 24 * 3600):
        # A mark that expires lets a change older than it through again: keep it longer
        # than the stream's retention (and any replay window).
        self.ttl_seconds = ttl_seconds

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """{key: version} for the keys that have a mark."""

    @abstractmethod
    def advance(self, key: str, version: str, now: float) -> bool:
        """Raise the mark to `version` if it is below; False if it was already there or above."""

    def advance_many(self, marks: Mapping[str, str], now: float) -> None:
        for key, v in marks.items():
            self.advance(key, v, now)


class InMemoryHighWaterMarkStore(HighWaterMarkStore):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.marks: dict[str, str] = {}
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        self.calls["get_many"] += 1
        return {k: self.marks[k] for k in keys if k in self.marks}

    def advance(self, key: str, version: str, now: float) -> bool:
        self.calls["advance"] += 1
        with self._lock:
            if key in self.marks and not self.marks[key] < version:
                return False
            self.marks[key] = version
            return True


class DynamoDbHighWaterMarkStore(HighWaterMarkStore):
    """Marks live in the idempotency table (key `id`), as items `hwm#<route>#<item hash>`."""

    def __init__(self, ddb, table: str, sleep: Callable[[float], None] = time.sleep, **kwargs):
        super().__init__(**kwargs)
        self._ddb, self.table, self._sleep = ddb, table, sleep

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        items = batch_get(self._ddb, self.table, list(dict.fromkeys(keys)), self._sleep)
        return {k: item["hwm"]["S"] for k, item in items.items() if "hwm" in item}

    def advance(self, key: str, version: str, now: float) -> bool:
        try:
            self._ddb.update_item(
                TableName=self.table,
                Key={"id": {"S": key}},
                UpdateExpression="SET hwm = :v, expires_at = :exp",
                ConditionExpression="attribute_not_exists(hwm) OR hwm < :v",
                ExpressionAttributeValues={":v": {"S": version}, ":exp": {"N": str(int(now) + self.ttl_seconds)}},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise mapped(exc, "UpdateItem") from exc
        return True
