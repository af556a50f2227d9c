"""Analytics: every change becomes one flat NDJSON event in Firehose (-> S3).

The audit handler writes to the same delivery stream; ``record_type`` tells the two apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orders_cdc.attrvalue import dumps_exact
from orders_cdc.change import ChangeRecord, EventName
from orders_cdc.routing import Idempotency, Route
from orders_cdc.settings import Resources
from processors._firehose import MAX_RECORD_BYTES, MAX_RECORDS, put_changes

if TYPE_CHECKING:
    from orders_cdc.app import Context

RECORD_TYPE = "analytics"


def event_type(change: ChangeRecord) -> str:
    if change.event is EventName.INSERT:
        return "order_created"
    if change.event is EventName.REMOVE:
        return "order_expired" if change.ttl_delete else "order_removed"
    status, before = change.new_value("status"), change.old_value("status")
    if status != before and status in ("shipped", "delivered", "cancelled"):
        return f"order_{status}"
    return "order_updated"


class _TooBig(Exception):
    pass


def flatten(value: Any, limit: int = MAX_RECORD_BYTES) -> dict[str, Any]:
    """{"a": {"b": [1, {"c": 2}]}} -> {"a.b.0": 1, "a.b.1.c": 2}: one level, for columnar stores.

    Every leaf repeats its whole path, so a legal 250 KB item of deep maps with long names
    can flatten to hundreds of MB: past `limit` characters of paths and values this stops
    and raises _TooBig (the caller sends a truncated event)."""
    out: dict[str, Any] = {}
    used = 0

    def walk(inner: Any, prefix: str) -> None:
        nonlocal used
        if isinstance(inner, dict):
            for key, item in inner.items():
                walk(item, f"{prefix}{key}.")
        elif isinstance(inner, list):
            for i, item in enumerate(inner):
                walk(item, f"{prefix}{i}.")
        else:
            used += len(prefix) + (len(inner) if isinstance(inner, (str, bytes)) else 16)
            if used > limit:
                raise _TooBig
            out[prefix[:-1]] = inner

    walk(value, "")
    return out


def to_event(change: ChangeRecord) -> dict[str, Any]:
    image = change.new_image if change.event is not EventName.REMOVE else change.old_image
    position = change.position
    return {
        "record_type": RECORD_TYPE,
        "event_type": event_type(change),
        "event_name": change.event.value,
        "table": change.table,
        "keys": change.keys,
        "created_at": change.created_at,
        # When this consumer handled it: created_at -> processed_at is the pipeline's lag.
        "processed_at": datetime.now(timezone.utc),
        "ttl_delete": change.ttl_delete,
        "shard_id": position.shard_id if position else None,
        "sequence_number": position.sequence_number if position else None,
        "sub_sequence_number": position.sub_sequence_number if position else None,
        **_item(image or {}),
    }


def _item(image: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"item": flatten(image)}
    except _TooBig:
        # Too big for one Firehose record once flattened: the top-level scalars only, marked.
        small = {k: v for k, v in image.items()
                 if not isinstance(v, (dict, list, set, frozenset)) and len(str(v)) <= 1024}
        return {"item": small, "item_truncated": True}


def firehose_copy(changes: Sequence[ChangeRecord], ctx: Context) -> None:
    put_changes(ctx, changes, lambda c: dumps_exact(to_event(c)) + b"\n")


def routes(resources: Resources) -> list[Route]:
    # A copy for analytics: at-least-once; readers dedup by (keys, created_at, event_name).
    return [Route("analytics.firehose_copy", resources.orders_table, firehose_copy, idempotency=Idempotency.OFF,
                  max_batch=MAX_RECORDS)]
