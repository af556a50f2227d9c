"""Factories for order items and the change records that carry them, in every wire shape the
consumer sees. Shared by all test tiers; everything is deterministic so sample files are stable.

Regenerate the sample files with ``python -m tests.factories``.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import orjson
from boto3.dynamodb.types import TypeSerializer

DEFAULT_CREATED_US = 1721011165891550  # 2024-07-15T02:39:25.891550Z, the record in notes/record-format.md
DEFAULT_ORDER_ID = "ORD-0001"
TTL_IDENTITY = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
SAMPLES_DIR = Path(__file__).parent / "samples"

_DEFAULT: Any = object()  # "not given" (None means "absent")
_serializer = TypeSerializer()

Line = Mapping[str, Any] | tuple[str, int | str | Decimal, int | str | Decimal]


# ---------------------------------------------------------------------------------------------
# Items


def order_item(
    order_id: str = DEFAULT_ORDER_ID,
    status: str = "PENDING",
    lines: Iterable[Line] | None = None,
    *,
    customer_id: str = "CUST-0001",
    currency: str = "EUR",
    version: int = 1,
    updated_at: str = "2024-07-15T02:39:25.891550Z",
    **extra: Any,
) -> dict[str, Any]:
    """A plain Python order item as boto3's resource API would return it (numbers are Decimal).
    ``lines`` entries are ``(sku, qty, price)`` tuples or ready dicts; ``extra`` adds/overrides attributes."""
    if lines is None:
        lines = [("SKU-1", 2, "19.99")]
    line_items = [_line(line) for line in lines]
    with localcontext(prec=200):  # the default 28-digit context would round 38-digit prices
        total = sum((line["qty"] * line["price"] for line in line_items), Decimal(0))
    item: dict[str, Any] = {
        "orderId": order_id,
        "status": status,
        "customerId": customer_id,
        "currency": currency,
        "lines": line_items,
        "total": total,
        "version": Decimal(version),
        "updatedAt": updated_at,
    }
    item.update(extra)
    return item


def _line(line: Line) -> dict[str, Any]:
    if isinstance(line, Mapping):
        return dict(line)
    sku, qty, price = line
    return {"sku": sku, "qty": Decimal(str(qty)), "price": Decimal(str(price))}


def av(value: Any) -> dict[str, Any]:
    """One Python value -> wire-form AttributeValue (B as base64 text, sets sorted)."""
    return _wire(_serializer.serialize(value))


def to_av(item: Mapping[str, Any]) -> dict[str, Any]:
    """A Python item -> wire-form image ``{name: AttributeValue}``, as in a change record's JSON."""
    return {name: av(value) for name, value in item.items()}


def _wire(attr: dict[str, Any]) -> dict[str, Any]:
    # TypeSerializer yields raw bytes and sets in hash order; JSON needs base64 and tests need
    # a stable order.
    ((tag, value),) = attr.items()
    if tag == "B":
        return {"B": _b64(value)}
    if tag == "BS":
        return {"BS": sorted(_b64(v) for v in value)}
    if tag == "SS":
        return {"SS": sorted(value)}
    if tag == "NS":
        return {"NS": sorted(value, key=Decimal)}
    if tag == "M":
        return {"M": {k: _wire(v) for k, v in value.items()}}
    if tag == "L":
        return {"L": [_wire(v) for v in value]}
    return attr


def _b64(value: Any) -> str:
    return base64.b64encode(bytes(value)).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Change records


def _images(event: str, new: Any, old: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if new is _DEFAULT:
        new = None if event == "REMOVE" else order_item(status="PAID" if event == "MODIFY" else "PENDING")
    if old is _DEFAULT:
        old = None if event == "INSERT" else order_item(status="PENDING" if event == "MODIFY" else "CANCELLED")
    return new, old


def _keys(keys: Mapping[str, Any] | None, new: Any, old: Any) -> dict[str, Any]:
    if keys is not None:
        return dict(keys)
    item = new if new is not None else old
    return {"orderId": item["orderId"] if item is not None else DEFAULT_ORDER_ID}


def _image_av(item: Any, override: Any) -> dict[str, Any] | None:
    if override is not _DEFAULT:
        return override
    return None if item is None else to_av(item)


def kds_record(
    event: str = "MODIFY",
    new: Mapping[str, Any] | None = _DEFAULT,
    old: Mapping[str, Any] | None = _DEFAULT,
    keys: Mapping[str, Any] | None = None,
    precision: str | None = "MICROSECOND",
    created_us: int = DEFAULT_CREATED_US,
    table: str = "Orders",
    ttl: bool = False,
    *,
    new_av: dict[str, Any] | None = _DEFAULT,
    old_av: dict[str, Any] | None = _DEFAULT,
    event_id: str | None = None,
    region: str = "us-east-1",
) -> dict[str, Any]:
    """A Kinesis-Data-Streams-for-DynamoDB change document (the JSON inside the Kinesis record).

    ``new``/``old`` are plain items (default: an order fitting ``event``; ``None`` = absent);
    ``new_av``/``old_av`` put a wire-form image in verbatim (for malformed-image tests).
    ``precision=None`` writes the legacy shape: 13-digit milliseconds and no precision field."""
    event = str(event)
    new, old = _images(event, new, old)
    key_item = _keys(keys, new, old)
    ddb: dict[str, Any] = {"ApproximateCreationDateTime": created_us if precision == "MICROSECOND" else created_us // 1000}
    if precision is not None:
        ddb["ApproximateCreationDateTimePrecision"] = precision
    ddb["Keys"] = to_av(key_item)
    new_image, old_image = _image_av(new, new_av), _image_av(old, old_av)
    if new_image is not None:
        ddb["NewImage"] = new_image
    if old_image is not None:
        ddb["OldImage"] = old_image
    ddb["SizeBytes"] = _size(ddb)
    return {
        "awsRegion": region,
        "eventID": event_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{table}|{event}|{key_item}|{created_us}")),
        "eventName": event,
        "userIdentity": dict(TTL_IDENTITY) if ttl else None,
        "recordFormat": "application/json",
        "tableName": table,
        "dynamodb": ddb,
        "eventSource": "aws:dynamodb",
    }


_VIEW_IMAGES = {
    "KEYS_ONLY": (False, False),
    "NEW_IMAGE": (True, False),
    "OLD_IMAGE": (False, True),
    "NEW_AND_OLD_IMAGES": (True, True),
}


def streams_record(
    event: str = "MODIFY",
    new: Mapping[str, Any] | None = _DEFAULT,
    old: Mapping[str, Any] | None = _DEFAULT,
    keys: Mapping[str, Any] | None = None,
    view: str = "NEW_AND_OLD_IMAGES",
    created_s: int | float | None = None,
    table: str = "Orders",
    ttl: bool = False,
    *,
    sequence: str = "111100000000012345678901",
    created_us: int = DEFAULT_CREATED_US,
    new_av: dict[str, Any] | None = _DEFAULT,
    old_av: dict[str, Any] | None = _DEFAULT,
    region: str = "us-east-1",
    account: str = "123456789012",
) -> dict[str, Any]:
    """A DynamoDB Streams record (the Lambda ``Records[i]`` shape). Images follow ``view``;
    the timestamp is whole seconds from ``created_us`` unless ``created_s`` is given."""
    event = str(event)
    new, old = _images(event, new, old)
    key_item = _keys(keys, new, old)
    with_new, with_old = _VIEW_IMAGES[view]
    ddb: dict[str, Any] = {
        "ApproximateCreationDateTime": created_s if created_s is not None else created_us // 1_000_000,
        "Keys": to_av(key_item),
    }
    new_image, old_image = _image_av(new, new_av), _image_av(old, old_av)
    if with_new and new_image is not None:
        ddb["NewImage"] = new_image
    if with_old and old_image is not None:
        ddb["OldImage"] = old_image
    ddb["SequenceNumber"] = sequence
    ddb["SizeBytes"] = _size(ddb)
    ddb["StreamViewType"] = view
    record: dict[str, Any] = {
        "eventID": hashlib.md5(f"{table}|{event}|{key_item}|{sequence}".encode()).hexdigest(),
        "eventName": event,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": region,
        "dynamodb": ddb,
        "eventSourceARN": f"arn:aws:dynamodb:{region}:{account}:table/{table}/stream/2024-07-15T00:00:00.000",
    }
    if ttl:
        record["userIdentity"] = dict(TTL_IDENTITY)
    return record


def _size(ddb: Mapping[str, Any]) -> int:
    # Only plausible, not DynamoDB's exact accounting.
    return len(orjson.dumps([ddb.get("Keys"), ddb.get("NewImage"), ddb.get("OldImage")]))


# ---------------------------------------------------------------------------------------------
# What the KCL MultiLangDaemon sends


def partition_key(doc: Mapping[str, Any]) -> str:
    """An opaque 32-hex partition key derived from the item key, like DynamoDB's."""
    keys = doc.get("dynamodb", {}).get("Keys", {})
    return hashlib.md5(orjson.dumps(keys, option=orjson.OPT_SORT_KEYS)).hexdigest().upper()


def kcl_record(
    doc: Mapping[str, Any],
    seq: str,
    sub: int = 0,
    pk: str | None = None,
    *,
    arrival_ms: int | None = None,
) -> dict[str, Any]:
    """One entry of a ``processRecords`` message: ``data`` is base64 of the document's JSON."""
    if arrival_ms is None:
        arrival_ms = _created_ms(doc) + 250  # Kinesis receives the change a little after the write
    return {
        "action": "record",
        "data": base64.b64encode(orjson.dumps(doc)).decode("ascii"),
        "partitionKey": pk if pk is not None else partition_key(doc),
        "sequenceNumber": seq,
        "subSequenceNumber": sub,
        "approximateArrivalTimestamp": arrival_ms,
    }


def _created_ms(doc: Mapping[str, Any]) -> int:
    ddb = doc.get("dynamodb", {})
    ts = ddb.get("ApproximateCreationDateTime")
    if not isinstance(ts, int):
        return DEFAULT_CREATED_US // 1000
    return ts // 1000 if ddb.get("ApproximateCreationDateTimePrecision") == "MICROSECOND" else ts


def process_records(records: list[dict[str, Any]], millis_behind_latest: int = 0) -> dict[str, Any]:
    """The daemon's ``processRecords`` message around ``kcl_record`` entries."""
    return {"action": "processRecords", "records": records, "millisBehindLatest": millis_behind_latest}


def sequence_number(n: int) -> str:
    """A realistic-looking, monotonically increasing Kinesis sequence number."""
    return str(49_651_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000 + n)


# ---------------------------------------------------------------------------------------------
# Sample files


def samples() -> dict[str, Any]:
    """File name -> content of every sample under tests/samples/."""
    shipped = order_item(status="SHIPPED", version=3, lines=[("SKU-1", 2, "19.99"), ("SKU-2", 1, "5.00")])
    paid = order_item(status="PAID", version=2, lines=[("SKU-1", 2, "19.99"), ("SKU-2", 1, "5.00")])
    insert = kds_record("INSERT")
    modify = kds_record("MODIFY", new=shipped, old=paid)
    out: dict[str, Any] = {
        "kds_insert.json": insert,
        "kds_modify.json": modify,
        "kds_remove.json": kds_record("REMOVE"),
        "kds_remove_ttl.json": kds_record("REMOVE", ttl=True),
        "kds_modify_millisecond.json": kds_record("MODIFY", new=shipped, old=paid, precision="MILLISECOND"),
        "kds_modify_legacy_no_precision.json": kds_record("MODIFY", new=shipped, old=paid, precision=None),
        "streams_remove_ttl.json": streams_record("REMOVE", ttl=True),
        "kcl_process_records.json": process_records(
            [kcl_record(insert, sequence_number(1)), kcl_record(modify, sequence_number(2))]
        ),
    }
    for view in _VIEW_IMAGES:
        out[f"streams_modify_{view.lower()}.json"] = streams_record("MODIFY", new=shipped, old=paid, view=view)
    return out


def sample_bytes(content: Any) -> bytes:
    return orjson.dumps(content, option=orjson.OPT_INDENT_2) + b"\n"


def write_samples(directory: Path = SAMPLES_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in samples().items():
        path = directory / name
        path.write_bytes(sample_bytes(content))
        written.append(path)
    return written


def load_sample(name: str) -> Any:
    return orjson.loads((SAMPLES_DIR / name).read_bytes())


if __name__ == "__main__":
    for path in write_samples():
        print(path)
