"""Audit trail: every change -> one entry saying who changed which attributes, old -> new.

Entries go to the analytics delivery stream (-> S3) with ``"record_type": "audit"``, in
PutRecordBatch chunks (processors/_firehose.py). The diff is per top-level attribute:
``added`` {name: value}, ``removed`` {name: value}, ``changed`` {name: {"old", "new"}}; a
nested attribute that changed (``items``) appears whole, both values. Numbers keep their
exact literals (dumps_exact).

Not idempotent by itself: a redelivered change writes a second, identical entry (same
``event_id``), which readers can drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from orders_cdc.attrvalue import dumps_exact
from orders_cdc.change import ChangeRecord
from orders_cdc.routing import Idempotency, Route
from orders_cdc.settings import Resources
from processors._firehose import MAX_RECORD_BYTES, MAX_RECORDS, put_changes

if TYPE_CHECKING:
    from orders_cdc.app import Context

RECORD_TYPE = "audit"


def diff(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    old, new = old or {}, new or {}
    return {
        "added": {k: v for k, v in new.items() if k not in old},
        "removed": {k: v for k, v in old.items() if k not in new},
        "changed": {k: {"old": old[k], "new": v} for k, v in new.items() if k in old and old[k] != v},
    }


def to_entry(change: ChangeRecord) -> dict[str, Any]:
    position = change.position
    return {
        "record_type": RECORD_TYPE,
        "table": change.table,
        "keys": change.keys,
        "item_key": change.item_key(),
        "event": change.event.value,
        "event_id": change.event_id,
        "created_at": change.created_at,
        "created_us": change.created_us,
        # KDS-for-DDB marks TTL deletions with the DynamoDB service principal; every other
        # change was made through the API, i.e. by the application.
        "who": "ttl" if change.ttl_delete else "application",
        "position": {
            "shard_id": position.shard_id,
            "sequence_number": position.sequence_number,
            "sub_sequence_number": position.sub_sequence_number,
        }
        if position
        else None,
        "diff": diff(change.old_image, change.new_image),
    }


def to_line(change: ChangeRecord) -> bytes:
    entry = to_entry(change)
    line = dumps_exact(entry) + b"\n"
    if len(line) > MAX_RECORD_BYTES:
        # Both images of a 400 KB item do not fit one Firehose record: keep which
        # attributes changed and drop their values rather than lose the entry.
        entry["diff"] = {kind: {name: None for name in names} for kind, names in entry["diff"].items()}
        entry["truncated"] = True
        line = dumps_exact(entry) + b"\n"
    return line


def firehose_audit(changes: Sequence[ChangeRecord], ctx: Context) -> None:
    put_changes(ctx, changes, to_line)


def routes(resources: Resources) -> list[Route]:
    # At-least-once: entries carry event_id, and a compliance reader drops repeats.
    return [Route("audit.firehose_audit", resources.orders_table, firehose_audit, idempotency=Idempotency.OFF,
                  max_batch=MAX_RECORDS)]
