"""The identity of one change, for idempotency and ordering.

The eventID is not a documented dedup key (a KDS-for-DDB duplicate may carry a new one),
so a change is named by what AWS says identifies it: the item key, the change's
ApproximateCreationDateTime, and its images. A redelivery, a KDS duplicate and a replay
from an earlier position all give the same key; two different changes do not.

A record in the DynamoDB Streams format (whole seconds, possibly KEYS_ONLY) also adds its
eventID, which that format documents as unique per change: two changes of an item in one
second with no images would otherwise look the same.
"""

from __future__ import annotations

import hashlib

import orjson

from orders_cdc.change import ChangeRecord, SourceFormat

_SEP = "\x1f"


def images_digest(change: ChangeRecord) -> str:
    """sha256 of both wire images with sorted keys (hex). Equal images, equal digest."""
    doc = {"new": change.new_av, "old": change.old_av}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def item_id(change: ChangeRecord) -> str:
    """The item across tables: table + canonical item key."""
    return change.table + _SEP + change.item_key()


def reaction_key(route: str, change: ChangeRecord, digest: str | None = None) -> str:
    """One route's reaction to one change. The route name stays readable (for operators);
    the rest is hashed so the key stays small whatever the item key."""
    digest = digest or images_digest(change)
    parts = [item_id(change), str(change.created_us), digest]
    if change.source is SourceFormat.STREAMS:
        parts.append(change.event_id)
    who = hashlib.sha256(_SEP.join(parts).encode()).hexdigest()
    return f"{route}#{who}"
