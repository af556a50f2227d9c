"""One decoded DynamoDB item change, from either wire format, and the decoders that build it.

Every bad input becomes a ``DecodeError`` that carries the original bytes, so the caller can
dead-letter the record and move on instead of stalling the shard on a poison pill.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import orjson

from .attrvalue import AttributeValueError, dumps_exact, to_json_compatible, unmarshal, unmarshal_map

__all__ = [
    "EventName",
    "SourceFormat",
    "StreamViewType",
    "Position",
    "DecodeError",
    "ChangeRecord",
    "decode_kinesis_data",
    "decode_streams_record",
    "decode_kcl_record",
    "decode_any",
    "to_output",
]


class EventName(StrEnum):
    INSERT = "INSERT"
    MODIFY = "MODIFY"
    REMOVE = "REMOVE"


class SourceFormat(StrEnum):
    KINESIS = "kinesis"  # Kinesis Data Streams for DynamoDB
    STREAMS = "streams"  # DynamoDB Streams (and the Lambda event shape)


class StreamViewType(StrEnum):
    KEYS_ONLY = "KEYS_ONLY"
    NEW_IMAGE = "NEW_IMAGE"
    OLD_IMAGE = "OLD_IMAGE"
    NEW_AND_OLD_IMAGES = "NEW_AND_OLD_IMAGES"


@dataclass(frozen=True, slots=True)
class Position:
    shard_id: str
    sequence_number: str
    sub_sequence_number: int = 0
    arrival: datetime | None = None  # tz-aware UTC


class DecodeError(ValueError):
    """Input that is not a valid change record. Permanent: retrying the same bytes cannot help."""

    def __init__(self, reason: str, raw: bytes, position: Position | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw
        self.position = position

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.raw, self.position))


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_TTL_IDENTITY = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
# Valid key numbers have <= 38 digits, so normalising in this context never rounds.
_KEY_NUMBER_CONTEXT = Context(prec=38)
_KEY_SAFE = "-_.~!$'()*+,;:@/#|"  # kept as-is; '%', '&', '=', spaces, non-ASCII: %-quoted


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """A decoded change. Images stay in wire form until asked for: routing usually needs one
    attribute (``status``), and most records are never fully unmarshalled."""

    table: str
    event: EventName
    event_id: str
    keys: dict[str, Any]
    created_at: datetime  # tz-aware UTC
    created_us: int  # epoch microseconds; exact, for per-item ordering and duplicate detection
    ttl_delete: bool
    size_bytes: int | None
    source: SourceFormat
    position: Position | None
    raw: bytes = field(repr=False)
    new_av: dict[str, Any] | None = field(repr=False)
    old_av: dict[str, Any] | None = field(repr=False)
    _new_image: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _old_image: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _item_key: str | None = field(default=None, init=False, repr=False, compare=False)

    # Images are validated lazily: a full check costs as much as a full decode, so a malformed
    # image surfaces as DecodeError on first access (new_image / new_value / validate()).

    @property
    def new_image(self) -> dict[str, Any] | None:
        """The decoded NewImage (cached; treat as read-only)."""
        if self.new_av is None:
            return None
        if self._new_image is None:
            object.__setattr__(self, "_new_image", self._decode_image(self.new_av, "NewImage"))
        return self._new_image

    @property
    def old_image(self) -> dict[str, Any] | None:
        """The decoded OldImage (cached; treat as read-only)."""
        if self.old_av is None:
            return None
        if self._old_image is None:
            object.__setattr__(self, "_old_image", self._decode_image(self.old_av, "OldImage"))
        return self._old_image

    def new_value(self, name: str, default: Any = None) -> Any:
        """One top-level NewImage attribute, without decoding the rest of the image."""
        return self._value(self.new_av, self._new_image, name, default, "NewImage")

    def old_value(self, name: str, default: Any = None) -> Any:
        return self._value(self.old_av, self._old_image, name, default, "OldImage")

    def validate(self) -> None:
        """Decode both images now, for callers that want every DecodeError up front."""
        _ = self.new_image, self.old_image

    def item_key(self) -> str:
        """Canonical ``name=value`` pairs sorted by name and joined with ``&``, values
        percent-quoted, numbers normalised (``1.0`` == ``1``): equal keys give equal strings."""
        if self._item_key is None:
            key = "&".join(f"{quote(k, safe=_KEY_SAFE)}={_key_part(v)}" for k, v in sorted(self.keys.items()))
            object.__setattr__(self, "_item_key", key)
        return self._item_key  # type: ignore[return-value]

    def _decode_image(self, av: dict[str, Any], root: str) -> dict[str, Any]:
        try:
            return unmarshal_map(av, root)
        except AttributeValueError as e:
            raise DecodeError(str(e), self.raw, self.position) from None

    def _value(
        self, av: dict[str, Any] | None, decoded: dict[str, Any] | None, name: str, default: Any, root: str
    ) -> Any:
        if decoded is not None:
            return decoded.get(name, default)
        if av is None or name not in av:
            return default
        try:
            return unmarshal(av[name], f"{root}.{name}")
        except AttributeValueError as e:
            raise DecodeError(str(e), self.raw, self.position) from None


def _key_part(value: Any) -> str:
    if isinstance(value, Decimal):
        if not value:
            return "0"
        return format(value.normalize(_KEY_NUMBER_CONTEXT), "f")
    if isinstance(value, bytes):
        return quote(base64.b64encode(value).decode("ascii"), safe=_KEY_SAFE)
    return quote(str(value), safe=_KEY_SAFE)


# ---------------------------------------------------------------------------------------------
# Field extraction. Each helper raises _Bad with a reason; the public decoders attach raw bytes.


class _Bad(Exception):
    pass


def _brief(value: Any) -> str:
    # Reasons go to logs and the dead-letter queue: quote the offending value, but not all of it.
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:45]}...({len(text)} chars)"


def _get_dict(obj: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = obj.get(name)
    if value is None:
        raise _Bad(f"missing field {where}")
    if type(value) is not dict:
        raise _Bad(f"field {where} must be an object, got {type(value).__name__}")
    return value


def _get_str(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if value is None:
        raise _Bad(f"missing field {where}")
    if type(value) is not str:
        raise _Bad(f"field {where} must be a string, got {type(value).__name__}")
    return value


_EVENTS = {e.value: e for e in EventName}  # a dict hit is ~10x cheaper than EventName(name)


def _event_name(doc: dict[str, Any]) -> EventName:
    name = _get_str(doc, "eventName", "eventName")
    event = _EVENTS.get(name)
    if event is None:
        raise _Bad(f"unknown eventName {_brief(name)} (expected INSERT, MODIFY or REMOVE)")
    return event


def _check_source(doc: dict[str, Any]) -> None:
    source = doc.get("eventSource")
    if source is not None and source != "aws:dynamodb":
        raise _Bad(f"eventSource is {_brief(source)}, not 'aws:dynamodb'")


def _ttl_delete(doc: dict[str, Any]) -> bool:
    identity = doc.get("userIdentity")
    if identity is not None and type(identity) is not dict:
        raise _Bad(f"field userIdentity must be an object or null, got {type(identity).__name__}")
    return identity is not None and all(identity.get(k) == v for k, v in _TTL_IDENTITY.items())


def _image(ddb: dict[str, Any], name: str) -> dict[str, Any] | None:
    image = ddb.get(name)
    if image is not None and type(image) is not dict:
        raise _Bad(f"field dynamodb.{name} must be an object, got {type(image).__name__}")
    return image


def _keys(ddb: dict[str, Any]) -> dict[str, Any]:
    keys_av = _get_dict(ddb, "Keys", "dynamodb.Keys")
    if not keys_av:
        raise _Bad("field dynamodb.Keys is empty")
    # Keys are a handful of S/N/B values: decoding them now validates them for free.
    return unmarshal_map(keys_av, "dynamodb.Keys")


def _size_bytes(ddb: dict[str, Any]) -> int | None:
    size = ddb.get("SizeBytes")
    if size is not None and (type(size) is not int or size < 0):
        raise _Bad(f"field dynamodb.SizeBytes must be a non-negative integer, got {_brief(size)}")
    return size


# Which images each event must carry. KDS-for-DDB always streams new and old images, so it
# uses the same rule as a stream whose view type is unknown.
_REQUIRED_IMAGES: dict[StreamViewType | None, dict[EventName, tuple[bool, bool]]] = {
    None: {EventName.INSERT: (True, False), EventName.MODIFY: (True, False), EventName.REMOVE: (False, True)},
    StreamViewType.KEYS_ONLY: {e: (False, False) for e in EventName},
    StreamViewType.NEW_IMAGE: {
        EventName.INSERT: (True, False),
        EventName.MODIFY: (True, False),
        EventName.REMOVE: (False, False),
    },
    StreamViewType.OLD_IMAGE: {
        EventName.INSERT: (False, False),
        EventName.MODIFY: (False, True),
        EventName.REMOVE: (False, True),
    },
    StreamViewType.NEW_AND_OLD_IMAGES: {
        EventName.INSERT: (True, False),
        EventName.MODIFY: (True, True),
        EventName.REMOVE: (False, True),
    },
}


def _check_images(
    event: EventName, view: StreamViewType | None, new_av: dict[str, Any] | None, old_av: dict[str, Any] | None
) -> None:
    needs_new, needs_old = _REQUIRED_IMAGES[view][event]
    suffix = f" with StreamViewType {view}" if view else ""
    if needs_new and new_av is None:
        raise _Bad(f"{event} record without dynamodb.NewImage{suffix}")
    if needs_old and old_av is None:
        raise _Bad(f"{event} record without dynamodb.OldImage{suffix}")


# ---------------------------------------------------------------------------------------------
# Timestamps. Kept as exact integers of microseconds: floats would blur the ordering and
# duplicate detection that ApproximateCreationDateTime is used for.

_UNITS_PER_SECOND = {"MILLISECOND": 1_000, "MICROSECOND": 1_000_000}


def _exact(value: Any, where: str) -> Decimal:
    if type(value) is int:
        return Decimal(value)
    if type(value) is float:
        # repr is the shortest literal that round-trips, i.e. what the JSON document said.
        return Decimal(repr(value))
    raise _Bad(f"field {where} must be a number, got {type(value).__name__}")


def _to_us(value: Any, units_per_second: int, where: str) -> int:
    if isinstance(value, datetime):  # boto3's dynamodbstreams client already parses it
        if value.tzinfo is None:
            raise _Bad(f"field {where} is a naive datetime")
        return (value - _EPOCH) // timedelta(microseconds=1)
    if type(value) is int and value > 0:
        return value * (1_000_000 // units_per_second)  # the common case, exact without Decimal
    number = _exact(value, where)
    if not number.is_finite() or number <= 0:
        raise _Bad(f"field {where} must be a positive epoch time, got {_brief(value)}")
    return int((number * 1_000_000 / units_per_second).to_integral_value())


def _infer_units(value: Any, where: str) -> int:
    # Only legacy KDS records lack a precision field; they are 13-digit milliseconds, but
    # seconds and microseconds are unambiguous by magnitude for any date after 1973.
    number = _exact(value, where)
    if number < 10**11:
        return 1
    if number < 10**14:
        return 1_000
    if number < 10**17:
        return 1_000_000
    raise _Bad(f"field {where} value {_brief(value)} is too large to be an epoch time")


def _utc(created_us: int, where: str) -> datetime:
    try:
        return _EPOCH + timedelta(microseconds=created_us)
    except OverflowError:
        raise _Bad(f"field {where} is out of datetime range") from None


def _kinesis_created_us(ddb: dict[str, Any]) -> int:
    where = "dynamodb.ApproximateCreationDateTime"
    value = ddb.get("ApproximateCreationDateTime")
    if value is None:
        raise _Bad(f"missing field {where}")
    precision = ddb.get("ApproximateCreationDateTimePrecision")
    if precision is None:
        units = _infer_units(value, where)
    elif type(precision) is str and precision in _UNITS_PER_SECOND:
        units = _UNITS_PER_SECOND[precision]
    else:
        raise _Bad(f"unknown ApproximateCreationDateTimePrecision {_brief(precision)}")
    return _to_us(value, units, where)


# ---------------------------------------------------------------------------------------------
# Format-specific builders.


def _looks_like_streams(doc: dict[str, Any]) -> bool:
    if "tableName" in doc:
        return False
    ddb = doc.get("dynamodb")
    return (
        "eventSourceARN" in doc
        or "eventVersion" in doc
        or (type(ddb) is dict and ("SequenceNumber" in ddb or "StreamViewType" in ddb))
    )


def _from_kinesis(doc: Any, raw: bytes, position: Position | None) -> ChangeRecord:
    if type(doc) is not dict:
        raise _Bad(f"change record must be a JSON object, got {type(doc).__name__}")
    if _looks_like_streams(doc):
        raise _Bad("this is a DynamoDB Streams record (no tableName, has eventSourceARN/SequenceNumber), not KDS-for-DDB")
    _check_source(doc)
    event = _event_name(doc)
    table = _get_str(doc, "tableName", "tableName")
    event_id = _get_str(doc, "eventID", "eventID")
    ddb = _get_dict(doc, "dynamodb", "dynamodb")
    keys = _keys(ddb)
    created_us = _kinesis_created_us(ddb)
    new_av, old_av = _image(ddb, "NewImage"), _image(ddb, "OldImage")
    _check_images(event, None, new_av, old_av)
    return ChangeRecord(
        table=table,
        event=event,
        event_id=event_id,
        keys=keys,
        created_at=_utc(created_us, "dynamodb.ApproximateCreationDateTime"),
        created_us=created_us,
        ttl_delete=_ttl_delete(doc),
        size_bytes=_size_bytes(ddb),
        source=SourceFormat.KINESIS,
        position=position,
        raw=raw,
        new_av=new_av,
        old_av=old_av,
    )


def _table_from_arn(arn: str) -> str:
    # arn:aws:dynamodb:us-east-1:123456789012:table/Orders/stream/2024-07-15T02:39:25.891
    parts = arn.split(":", 5)
    resource = parts[5].split("/") if len(parts) == 6 else []
    if len(resource) < 2 or resource[0] != "table" or not resource[1] or parts[2] != "dynamodb":
        raise _Bad(f"eventSourceARN {_brief(arn)} is not a DynamoDB table stream ARN")
    return resource[1]


def _from_streams(doc: Any, raw: bytes, position: Position | None) -> ChangeRecord:
    if type(doc) is not dict:
        raise _Bad(f"change record must be a JSON object, got {type(doc).__name__}")
    _check_source(doc)
    event = _event_name(doc)
    table = _table_from_arn(_get_str(doc, "eventSourceARN", "eventSourceARN"))
    event_id = _get_str(doc, "eventID", "eventID")
    ddb = _get_dict(doc, "dynamodb", "dynamodb")
    keys = _keys(ddb)
    where = "dynamodb.ApproximateCreationDateTime"
    value = ddb.get("ApproximateCreationDateTime")
    if value is None:
        raise _Bad(f"missing field {where}")
    created_us = _to_us(value, 1, where)
    view_name = ddb.get("StreamViewType")
    try:
        view = None if view_name is None else StreamViewType(view_name)
    except ValueError:
        raise _Bad(f"unknown StreamViewType {_brief(view_name)}") from None
    new_av, old_av = _image(ddb, "NewImage"), _image(ddb, "OldImage")
    _check_images(event, view, new_av, old_av)
    sequence = ddb.get("SequenceNumber")
    if sequence is not None and type(sequence) is not str:
        raise _Bad(f"field dynamodb.SequenceNumber must be a string, got {type(sequence).__name__}")
    if position is None and sequence is not None:
        position = Position(shard_id="", sequence_number=sequence)
    return ChangeRecord(
        table=table,
        event=event,
        event_id=event_id,
        keys=keys,
        created_at=_utc(created_us, where),
        created_us=created_us,
        ttl_delete=_ttl_delete(doc),
        size_bytes=_size_bytes(ddb),
        source=SourceFormat.STREAMS,
        position=position,
        raw=raw,
        new_av=new_av,
        old_av=old_av,
    )


def _load(data: bytes) -> Any:
    if not data:
        raise _Bad("empty record data")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise _Bad(f"record data is not JSON ({e})") from None


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    # surrogatepass: never fail here; invalid text then fails JSON parsing with a proper DecodeError.
    return data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)


def _raw_of(obj: Any) -> bytes:
    """Bytes for the dead-letter queue when the input arrived already parsed."""
    try:
        return dumps_exact(obj)
    except TypeError:
        return repr(obj).encode("utf-8", "surrogatepass")


def _build(
    builder: Callable[[Any, bytes, Position | None], ChangeRecord], doc: Any, raw: bytes, position: Position | None
) -> ChangeRecord:
    try:
        return builder(doc, raw, position)
    except (_Bad, AttributeValueError) as e:
        raise DecodeError(str(e), raw, position) from None


# ---------------------------------------------------------------------------------------------
# Public decoders.


def decode_kinesis_data(data: bytes, position: Position | None = None) -> ChangeRecord:
    """A KDS-for-DDB record's ``Data`` (already base64-decoded) -> ChangeRecord."""
    raw = _as_bytes(data)
    try:
        doc = _load(raw)
    except _Bad as e:
        raise DecodeError(str(e), raw, position) from None
    return _build(_from_kinesis, doc, raw, position)


def decode_streams_record(obj: dict[str, Any] | bytes | str, position: Position | None = None) -> ChangeRecord:
    """A DynamoDB Streams record (the Lambda ``Records[i]`` shape), as a dict or JSON bytes."""
    if isinstance(obj, dict):
        return _build(_from_streams, obj, _raw_of(obj), position)
    raw = _as_bytes(obj)
    try:
        doc = _load(raw)
    except _Bad as e:
        raise DecodeError(str(e), raw, position) from None
    return _build(_from_streams, doc, raw, position)


def _arrival(rec: dict[str, Any]) -> datetime | None:
    value = rec.get("approximateArrivalTimestamp")
    if value is None:
        return None
    return _utc(_to_us(value, 1_000, "approximateArrivalTimestamp"), "approximateArrivalTimestamp")


def decode_kcl_record(rec: dict[str, Any], shard_id: str) -> ChangeRecord:
    """One entry of a MultiLangDaemon ``processRecords`` message -> ChangeRecord (KDS-for-DDB)."""
    if type(rec) is not dict:
        raise DecodeError(f"KCL record must be an object, got {type(rec).__name__}", _raw_of(rec))
    try:
        sequence = _get_str(rec, "sequenceNumber", "sequenceNumber")
        sub = rec.get("subSequenceNumber") or 0
        if type(sub) is not int:
            raise _Bad(f"field subSequenceNumber must be an integer, got {_brief(sub)}")
        position = Position(shard_id, sequence, sub, _arrival(rec))
        data = _get_str(rec, "data", "data")
    except _Bad as e:
        raise DecodeError(str(e), _raw_of(rec)) from None
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as e:  # binascii.Error, or non-ASCII text
        raise DecodeError(f"record data is not valid base64 ({e})", _as_bytes(data), position) from None
    return decode_kinesis_data(raw, position)


def decode_any(line: bytes | str) -> ChangeRecord:
    """For operators: a KDS-for-DDB document, the same base64-encoded, a DynamoDB Streams record,
    or a Lambda event holding exactly one such record. The shape decides the format."""
    raw = _as_bytes(line).strip()
    if not raw:
        raise DecodeError("empty input", raw)
    if raw[:1] != b"{":
        try:
            # base64 tools wrap lines; interior whitespace is not part of the data.
            raw = base64.b64decode(b"".join(raw.split()), validate=True)
        except ValueError as e:
            raise DecodeError(f"input is neither a JSON object nor base64 ({e})", raw) from None
    try:
        doc = _load(raw)
        if type(doc) is dict and "Records" in doc and "dynamodb" not in doc:
            records = doc["Records"]
            if type(records) is not list or len(records) != 1:
                count = len(records) if type(records) is list else type(records).__name__
                raise _Bad(f"Lambda event must hold exactly one record to decode, got {count}")
            doc = records[0]
    except _Bad as e:
        raise DecodeError(str(e), raw) from None
    if type(doc) is dict and _looks_like_streams(doc):
        return _build(_from_streams, doc, raw, None)
    return _build(_from_kinesis, doc, raw, None)


def to_output(change: ChangeRecord) -> dict[str, Any]:
    """A JSON-ready view of a change (numbers stay Decimal; write it with ``dumps_exact``)."""
    return to_json_compatible(
        {
            "table": change.table,
            "event": change.event.value,
            "keys": change.keys,
            "new": change.new_image,
            "old": change.old_image,
            "created_at": change.created_at,
            "ttl_delete": change.ttl_delete,
        }
    )
