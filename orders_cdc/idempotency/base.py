"""The idempotency store: a public lifecycle on four small backend methods.

A record per (route, change) key, in one of two states:

- INPROGRESS: a lock with a lease. Taken by one conditional write; free again when its
  lease (`lock_until`) has passed, so a worker that crashed mid-reaction blocks the change
  only until then. Its owner (this process) may take it again at once.
- COMPLETED: the reaction happened. Kept until `expires_at` (epoch seconds, the DynamoDB
  TTL attribute), which must outlast the stream's retention so a replay is still caught.
  DynamoDB deletes expired items lazily, so readers treat an expired record as absent.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from orders_cdc.idempotency.exceptions import IdempotencyAlreadyCompletedError, IdempotencyInProgressError


class Status(StrEnum):
    INPROGRESS = "INPROGRESS"
    COMPLETED = "COMPLETED"


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    key: str
    status: Status
    expires_at: int  # epoch seconds (TTL)
    lock_until: float = 0.0  # epoch seconds; INPROGRESS only
    owner: str = ""

    def expired(self, now: float) -> bool:
        return self.expires_at < now

    def free_for(self, owner: str, now: float) -> bool:
        """May `owner` take the lock at `now`? (The same rule as the DynamoDB condition.)"""
        return self.expired(now) or (
            self.status is Status.INPROGRESS and (self.lock_until <= now or self.owner == owner)
        )


class IdempotencyStore(ABC):
    def __init__(self, ttl_seconds: int = 7 * 24 * 3600, lock_seconds: float = 90.0, owner: str | None = None):
        self.ttl_seconds = ttl_seconds
        self.lock_seconds = lock_seconds
        self.owner = owner or uuid.uuid4().hex  # one per process: a restarted child is a new owner

    # -- lifecycle ------------------------------------------------------------------------

    def completed(self, keys: Iterable[str], now: float) -> set[str]:
        """The keys whose reaction is already done (batched reads)."""
        records = self._get_many(list(dict.fromkeys(keys)))
        return {k for k, r in records.items() if r.status is Status.COMPLETED and not r.expired(now)}

    def save_inprogress(self, key: str, now: float) -> None:
        """Take the lock, or raise IdempotencyAlreadyCompletedError / IdempotencyInProgressError."""
        record = IdempotencyRecord(key, Status.INPROGRESS, int(now) + self.ttl_seconds,
                                   now + self.lock_seconds, self.owner)
        existing = self._put_if_free(record, now)
        if existing is None:
            return
        if existing.status is Status.COMPLETED:
            raise IdempotencyAlreadyCompletedError(key)
        raise IdempotencyInProgressError(f"reaction locked by another worker until {existing.lock_until:.0f}",
                                         until=existing.lock_until)

    def save_success(self, keys: Sequence[str], now: float) -> None:
        """Mark reactions done; returns once durable."""
        if keys:
            self._put_many([IdempotencyRecord(k, Status.COMPLETED, int(now) + self.ttl_seconds) for k in keys])

    def delete(self, keys: Sequence[str]) -> None:
        """Release locks after a failed reaction, so a retry (ours or another worker's)
        need not wait for the lease to run out."""
        if keys:
            self._delete_many(keys)

    # -- backend --------------------------------------------------------------------------

    @abstractmethod
    def _get_many(self, keys: Sequence[str]) -> Mapping[str, IdempotencyRecord]:
        """Strongly consistent reads; missing keys are left out."""

    @abstractmethod
    def _put_if_free(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Write `record` if the key is absent or `free_for(record.owner, now)`; else
        write nothing and return the record in the way."""

    @abstractmethod
    def _put_many(self, records: Sequence[IdempotencyRecord]) -> None:
        """Unconditional writes (COMPLETED markers)."""

    @abstractmethod
    def _delete_many(self, keys: Sequence[str]) -> None: ...
