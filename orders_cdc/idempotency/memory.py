"""An in-memory idempotency store for tests: the same lifecycle, a dict behind it."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import Decimal

from orders_cdc.counters import CounterUpdate, ItemKey
from orders_cdc.idempotency.base import IdempotencyRecord, IdempotencyStore, Status


class InMemoryIdempotencyStore(IdempotencyStore):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.records: dict[str, IdempotencyRecord] = {}
        self.calls: Counter[str] = Counter()  # backend method -> calls, to check batching
        self.counters: dict[ItemKey, dict[str, Decimal]] = {}  # what ATOMIC routes committed
        self._lock = threading.Lock()  # handlers run in worker threads

    def _get_many(self, keys: Sequence[str]) -> Mapping[str, IdempotencyRecord]:
        self.calls["get_many"] += 1
        with self._lock:
            return {k: self.records[k] for k in keys if k in self.records}

    def _put_if_free(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        self.calls["put_if_free"] += 1
        with self._lock:
            existing = self.records.get(record.key)
            if existing is not None and not existing.free_for(record.owner, now):
                return existing
            self.records[record.key] = record
            return None

    def _put_many(self, records: Sequence[IdempotencyRecord]) -> None:
        self.calls["put_many"] += 1
        with self._lock:
            self.records.update({r.key: r for r in records})

    def _delete_many(self, keys: Sequence[str]) -> None:
        self.calls["delete_many"] += 1
        with self._lock:
            for key in keys:
                record = self.records.get(key)
                if record is not None and record.status is Status.INPROGRESS and record.owner == self.owner:
                    del self.records[key]

    def _transact(self, markers: Sequence[IdempotencyRecord], updates: Sequence[CounterUpdate], now: float) -> set[str]:
        self.calls["transact"] += 1
        with self._lock:
            existing = {m.key for m in markers if m.key in self.records and not self.records[m.key].expired(now)}
            if existing:
                return existing
            for update in updates:
                counters = self.counters.setdefault(update.item, {})
                for attr, delta in update.deltas:
                    counters[attr] = counters.get(attr, Decimal(0)) + delta
            self.records.update({m.key: m for m in markers})
            return set()
