"""JSON logs on stderr. stdout is the KCL protocol channel in the child: nothing logs there."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter


def setup(level: str = "INFO", **static_fields: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields=static_fields or None,
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # botocore's DEBUG output is large and can contain request bodies.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING))


def record_fields(change, shard: str | None = None, raw: Mapping[str, Any] | None = None, route: str | None = None,
                  outcome: str | None = None) -> dict[str, Any]:
    """The `extra` fields of every record-level log line: shard, sequence (and
    sub-sequence), order id, route and outcome. Identifiers only, never the images: no
    customer data reaches the logs through them.

    `change` is the decoded ChangeRecord, or None when the record did not decode (then the
    sequence comes from the daemon's `raw` record and the order id is unknown). `shard`
    defaults to the change's own (handlers have the change, not the shard)."""
    position = getattr(change, "position", None)
    if shard is None:
        shard = position.shard_id if position is not None else None
    if position is not None:
        sequence, sub = position.sequence_number, position.sub_sequence_number
    else:
        sequence, sub = (raw or {}).get("sequenceNumber"), int((raw or {}).get("subSequenceNumber") or 0)
    return {"shard": shard, "sequence": sequence, "sub_sequence": sub, "order_id": order_id(change),
            "route": route, "outcome": outcome}


def order_id(change) -> str | None:
    """The changed item's key as an id: `order_id` for the Orders table, else its key values."""
    keys = getattr(change, "keys", None)
    if not keys:
        return None
    if "order_id" in keys:
        return str(keys["order_id"])
    return "/".join(f"{name}={keys[name]}" for name in sorted(keys))
