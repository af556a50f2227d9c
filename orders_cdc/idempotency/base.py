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
from dataclasses import dataclass, field
from enum import StrEnum

from orders_cdc.counters import MAX_TRANSACTION_ITEMS, CounterUpdate, TooManyCounters, groups, items_of, merge
from orders_cdc.errors import FatalProcessingError, Failure, classify
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


@dataclass
class CommitResult:
    """What `IdempotencyStore.commit` did with each entry (by index)."""

    done: list[int] = field(default_factory=list)
    duplicate: list[int] = field(default_factory=list)  # its marker was there: counted before
    failed: dict[int, BaseException] = field(default_factory=dict)


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
        refused = self.save_inprogress_many([key], now)
        if key in refused:
            raise refused[key]

    def save_inprogress_many(self, keys: Sequence[str], now: float) -> dict[str, BaseException]:
        """Take the locks; returns why for each key not locked: IdempotencyAlreadyCompletedError,
        IdempotencyInProgressError, or the store's error (a FatalProcessingError is raised)."""
        records = [IdempotencyRecord(k, Status.INPROGRESS, int(now) + self.ttl_seconds, now + self.lock_seconds,
                                     self.owner) for k in keys]
        try:
            in_the_way = self._put_many_if_free(records, now)
        except FatalProcessingError:
            raise
        except Exception as exc:  # noqa: BLE001 - every key of the call failed with it
            return {k: exc for k in keys}
        refused: dict[str, BaseException] = {}
        for key, existing in in_the_way.items():
            if existing.status is Status.COMPLETED:
                refused[key] = IdempotencyAlreadyCompletedError(key)
            else:
                refused[key] = IdempotencyInProgressError(
                    f"reaction locked by another worker until {existing.lock_until:.0f}", until=existing.lock_until)
        return refused

    def save_success(self, keys: Sequence[str], now: float) -> None:
        """Mark reactions done; returns once durable."""
        if keys:
            self._put_many([IdempotencyRecord(k, Status.COMPLETED, int(now) + self.ttl_seconds) for k in keys])

    def delete(self, keys: Sequence[str]) -> None:
        """Release our locks after a failed reaction, so a retry (ours or another worker's)
        need not wait for the lease to run out. A lock that is not ours (any more), or a
        COMPLETED marker, is left as it is."""
        if keys:
            self._delete_many(keys)

    def commit(self, entries: Sequence[tuple[str, Sequence[CounterUpdate]]], now: float) -> CommitResult:
        """Apply each (key, counter updates) entry exactly once: its updates and its
        COMPLETED marker in the same transaction, conditional on the marker not existing.

        Entries are grouped (see counters.groups); a group whose transaction finds some
        markers already there drops those entries (DUPLICATE) and commits the rest. A group
        that fails fails its entries only. An entry with no updates is done without a write;
        one too big for a transaction is committed in parts (`_commit_in_parts`).
        """
        result, seen, todo = CommitResult(), set(), []
        for i, (key, updates) in enumerate(entries):
            if key in seen:
                result.duplicate.append(i)
            elif not updates:
                result.done.append(i)
            else:
                try:
                    items_of(updates)
                except TooManyCounters:
                    self._commit_in_parts(i, key, updates, now, result)
                else:
                    todo.append(i)
            seen.add(key)
        for group in groups([entries[i][1] for i in todo]):
            self._commit_group([todo[g] for g in group], entries, now, result)
        return result

    def _commit_in_parts(self, i: int, key: str, updates: Sequence[CounterUpdate], now: float,
                         result: CommitResult) -> None:
        """One change whose counters do not fit one transaction (an order of 99+ products):
        its updates in parts, each part committed with a part marker of its own, the last part
        also with the change's marker. A redelivery skips the parts already committed and
        finishes the rest: still exactly once."""
        merged = merge(updates)
        size = MAX_TRANSACTION_ITEMS - 2  # room for the part marker and, in the last, the change's
        parts = [merged[start : start + size] for start in range(0, len(merged), size)]
        expires = int(now) + self.ttl_seconds
        fresh = False
        for n, part in enumerate(parts):
            markers = [IdempotencyRecord(f"{key}#part{n}", Status.COMPLETED, expires)]
            if n == len(parts) - 1:
                markers.append(IdempotencyRecord(key, Status.COMPLETED, expires))
            try:
                existing = self._transact(markers, part, now)
            except Exception as exc:  # noqa: BLE001 - the parts done stay done; the retry does the rest
                result.failed[i] = exc
                return
            fresh = fresh or not existing
        (result.done if fresh else result.duplicate).append(i)

    def _commit_group(self, members: list[int], entries, now: float, result: CommitResult) -> None:
        while members:
            try:
                updates = merge(u for i in members for u in entries[i][1])
                markers = [IdempotencyRecord(entries[i][0], Status.COMPLETED, int(now) + self.ttl_seconds)
                           for i in members]
                existing = self._transact(markers, updates, now)
            except Exception as exc:  # noqa: BLE001 - classified per change by the pipeline
                if len(members) > 1 and classify(exc) is Failure.PERMANENT:
                    # One change's bad value (a key too long, a number DynamoDB refuses)
                    # cancels the whole group: find it, so that only it is dead-lettered.
                    for i in members:
                        self._commit_group([i], entries, now, result)
                    return
                result.failed.update({i: exc for i in members})
                return
            if not existing:
                result.done.extend(members)
                return
            left = [i for i in members if entries[i][0] not in existing]
            if len(left) == len(members):
                raise AssertionError(f"transaction refused for markers not in it: {sorted(existing)[:3]}")
            result.duplicate.extend(i for i in members if entries[i][0] in existing)
            members = left

    # -- backend --------------------------------------------------------------------------

    @abstractmethod
    def _get_many(self, keys: Sequence[str]) -> Mapping[str, IdempotencyRecord]:
        """Strongly consistent reads; missing keys are left out."""

    @abstractmethod
    def _put_if_free(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Write `record` if the key is absent or `free_for(record.owner, now)`; else
        write nothing and return the record in the way."""

    def _put_many_if_free(self, records: Sequence[IdempotencyRecord], now: float) -> Mapping[str, IdempotencyRecord]:
        """`_put_if_free` for each record; {key: the record in the way} for those not written.
        A backend with a batch call overrides this."""
        return {r.key: existing for r in records if (existing := self._put_if_free(r, now)) is not None}

    @abstractmethod
    def _put_many(self, records: Sequence[IdempotencyRecord]) -> None:
        """Unconditional writes (COMPLETED markers)."""

    @abstractmethod
    def _delete_many(self, keys: Sequence[str]) -> None: ...

    @abstractmethod
    def _transact(self, markers: Sequence[IdempotencyRecord], updates: Sequence[CounterUpdate], now: float) -> set[str]:
        """All or nothing: apply ``updates`` and write ``markers``, if no marker's key holds
        an unexpired record. If some do, write nothing and return their keys."""
