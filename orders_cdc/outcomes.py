"""What became of each record of a batch: one outcome per record, and per route."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orders_cdc.change import ChangeRecord


class Outcome(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # no route matched
    DUPLICATE = "duplicate"  # every reaction was done before (redelivery, KDS duplicate, replay)
    STALE = "stale"  # older than what the route already applied
    DEAD_LETTERED = "dead_lettered"
    # Not settled: the worker was asked to stop (SIGTERM) before this record's reactions
    # ran. Never checkpointed; the shard's next owner does it.
    UNSETTLED = "unsettled"


@dataclass(frozen=True, slots=True)
class RecordResult:
    sequence_number: str
    sub_sequence_number: int
    outcome: Outcome
    change: ChangeRecord | None = None
    reason: str | None = None
    routes: tuple[tuple[str, Outcome], ...] = ()  # per route, for the record's routed changes
