import base64
import copy
import dataclasses
import pickle
from datetime import datetime, timezone
from decimal import Decimal

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orders_cdc.attrvalue import dumps_exact
from orders_cdc.change import (
    ChangeRecord,
    DecodeError,
    EventName,
    Position,
    SourceFormat,
    decode_any,
    decode_kcl_record,
    decode_kinesis_data,
    decode_streams_record,
    to_output,
)
from tests.factories import (
    DEFAULT_CREATED_US,
    SAMPLES_DIR,
    av,
    kcl_record,
    kds_record,
    load_sample,
    order_item,
    sample_bytes,
    samples,
    sequence_number,
    streams_record,
    to_av,
)

SHARD = "shardId-000000000007"
CREATED_AT = datetime(2024, 7, 15, 2, 39, 25, 891550, tzinfo=timezone.utc)


def kds(doc: dict, position: Position | None = None) -> ChangeRecord:
    return decode_kinesis_data(orjson.dumps(doc), position)


def decode_error(fn, *args) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        fn(*args)
    return info.value


# ---------------------------------------------------------------------------------------------
# KDS-for-DDB


def test_kds_modify():
    new = order_item(status="SHIPPED", version=2)
    old = order_item(status="PAID")
    doc = kds_record("MODIFY", new=new, old=old)
    data = orjson.dumps(doc)
    position = Position(SHARD, sequence_number(1), 3, CREATED_AT)
    change = decode_kinesis_data(data, position)
    assert change.table == "Orders"
    assert change.event is EventName.MODIFY
    assert change.event_id == doc["eventID"]
    assert change.keys == {"orderId": "ORD-0001"}
    assert change.created_at == CREATED_AT
    assert change.created_at.tzinfo is timezone.utc
    assert change.created_us == DEFAULT_CREATED_US
    assert change.ttl_delete is False
    assert change.size_bytes == doc["dynamodb"]["SizeBytes"]
    assert change.source is SourceFormat.KINESIS
    assert change.position is position
    assert change.raw == data
    assert change.new_av == doc["dynamodb"]["NewImage"]
    assert change.old_av == doc["dynamodb"]["OldImage"]
    assert change.new_image == new
    assert change.old_image == old
    assert change.new_value("status") == "SHIPPED"
    assert change.old_value("status") == "PAID"
    assert change.new_value("total") == Decimal("39.98")


def test_kds_insert_has_no_old_image():
    change = kds(kds_record("INSERT"))
    assert change.event is EventName.INSERT
    assert change.old_av is None and change.old_image is None
    assert change.old_value("status", "none") == "none"
    assert change.new_value("status") == "PENDING"


def test_kds_remove_has_no_new_image():
    change = kds(kds_record("REMOVE"))
    assert change.event is EventName.REMOVE
    assert change.new_av is None and change.new_image is None
    assert change.new_value("status") is None
    assert change.old_value("status") == "CANCELLED"
    assert change.ttl_delete is False


def test_kds_ttl_delete():
    change = kds(kds_record("REMOVE", ttl=True))
    assert change.ttl_delete is True


@pytest.mark.parametrize(
    "identity",
    [None, {"type": "Service", "principalId": "other.amazonaws.com"}, {"type": "User", "principalId": "dynamodb.amazonaws.com"}, {}],
)
def test_only_the_dynamodb_service_identity_is_a_ttl_delete(identity):
    doc = kds_record("REMOVE")
    doc["userIdentity"] = identity
    assert kds(doc).ttl_delete is False


def test_missing_user_identity_is_not_a_ttl_delete():
    doc = kds_record("REMOVE")
    del doc["userIdentity"]
    assert kds(doc).ttl_delete is False


def test_composite_and_numeric_keys():
    doc = kds_record("INSERT", keys={"customerId": "CUST-9", "orderNo": Decimal(17)})
    assert kds(doc).keys == {"customerId": "CUST-9", "orderNo": Decimal(17)}


# ---------------------------------------------------------------------------------------------
# Timestamps


@pytest.mark.parametrize(
    ("value", "precision", "expected_us"),
    [
        (1721011165891550, "MICROSECOND", 1721011165891550),
        (1721011165891, "MILLISECOND", 1721011165891000),
        (1721011165891, None, 1721011165891000),  # legacy: 13-digit ms, no precision field
        (1721011165891550, None, 1721011165891550),  # tolerated: 16-digit µs
        (1721011165, None, 1721011165000000),  # tolerated: 10-digit s
        (1721011165891.0, "MILLISECOND", 1721011165891000),
    ],
)
def test_creation_time_precisions(value, precision, expected_us):
    doc = kds_record("MODIFY")
    doc["dynamodb"]["ApproximateCreationDateTime"] = value
    doc["dynamodb"].pop("ApproximateCreationDateTimePrecision")
    if precision is not None:
        doc["dynamodb"]["ApproximateCreationDateTimePrecision"] = precision
    change = kds(doc)
    assert change.created_us == expected_us
    assert type(change.created_us) is int
    assert change.created_at.tzinfo is timezone.utc
    assert int(change.created_at.timestamp()) == expected_us // 1_000_000
    assert change.created_at.microsecond == expected_us % 1_000_000


def test_factory_precisions_agree():
    us = kds(kds_record(precision="MICROSECOND"))
    ms = kds(kds_record(precision="MILLISECOND"))
    legacy = kds(kds_record(precision=None))
    assert us.created_at == CREATED_AT
    assert ms.created_us == legacy.created_us == DEFAULT_CREATED_US // 1000 * 1000
    assert "ApproximateCreationDateTimePrecision" not in kds_record(precision=None)["dynamodb"]


@pytest.mark.parametrize(
    ("value", "precision", "reason"),
    [
        ("1721011165891", "MILLISECOND", "must be a number, got str"),
        (True, "MILLISECOND", "must be a number, got bool"),
        (None, "MILLISECOND", "missing field dynamodb.ApproximateCreationDateTime"),
        (0, "MILLISECOND", "must be a positive epoch time"),
        (-5, "MICROSECOND", "must be a positive epoch time"),
        (1721011165891, "NANOSECOND", "unknown ApproximateCreationDateTimePrecision 'NANOSECOND'"),
        (1721011165891, ["MILLISECOND"], "unknown ApproximateCreationDateTimePrecision ['MILLISECOND']"),
        (10**18, None, "too large to be an epoch time"),
        (1e300, None, "too large to be an epoch time"),
        (10**18, "MILLISECOND", "out of datetime range"),
    ],
)
def test_bad_creation_time(value, precision, reason):
    doc = kds_record("MODIFY")
    doc["dynamodb"]["ApproximateCreationDateTime"] = value
    doc["dynamodb"]["ApproximateCreationDateTimePrecision"] = precision
    if precision is None:
        del doc["dynamodb"]["ApproximateCreationDateTimePrecision"]
    err = decode_error(kds, doc)
    assert reason in err.reason


# ---------------------------------------------------------------------------------------------
# DynamoDB Streams


@pytest.mark.parametrize(
    ("view", "event", "has_new", "has_old"),
    [
        ("KEYS_ONLY", "INSERT", False, False),
        ("KEYS_ONLY", "MODIFY", False, False),
        ("KEYS_ONLY", "REMOVE", False, False),
        ("NEW_IMAGE", "INSERT", True, False),
        ("NEW_IMAGE", "MODIFY", True, False),
        ("NEW_IMAGE", "REMOVE", False, False),
        ("OLD_IMAGE", "INSERT", False, False),
        ("OLD_IMAGE", "MODIFY", False, True),
        ("OLD_IMAGE", "REMOVE", False, True),
        ("NEW_AND_OLD_IMAGES", "INSERT", True, False),
        ("NEW_AND_OLD_IMAGES", "MODIFY", True, True),
        ("NEW_AND_OLD_IMAGES", "REMOVE", False, True),
    ],
)
def test_streams_every_view_type(view, event, has_new, has_old):
    record = streams_record(event, view=view)
    change = decode_streams_record(record)
    assert change.source is SourceFormat.STREAMS
    assert change.event == event
    assert change.table == "Orders"
    assert change.keys == {"orderId": "ORD-0001"}
    assert (change.new_image is not None) is has_new
    assert (change.old_image is not None) is has_old
    assert change.created_at == datetime(2024, 7, 15, 2, 39, 25, tzinfo=timezone.utc)
    assert change.position == Position("", record["dynamodb"]["SequenceNumber"])
    assert change.event_id == record["eventID"]


@pytest.mark.parametrize(
    ("view", "event", "drop", "reason"),
    [
        ("NEW_IMAGE", "INSERT", "NewImage", "INSERT record without dynamodb.NewImage with StreamViewType NEW_IMAGE"),
        ("NEW_IMAGE", "MODIFY", "NewImage", "MODIFY record without dynamodb.NewImage"),
        ("OLD_IMAGE", "MODIFY", "OldImage", "MODIFY record without dynamodb.OldImage"),
        ("OLD_IMAGE", "REMOVE", "OldImage", "REMOVE record without dynamodb.OldImage"),
        ("NEW_AND_OLD_IMAGES", "INSERT", "NewImage", "INSERT record without dynamodb.NewImage"),
        ("NEW_AND_OLD_IMAGES", "MODIFY", "NewImage", "MODIFY record without dynamodb.NewImage"),
        ("NEW_AND_OLD_IMAGES", "MODIFY", "OldImage", "MODIFY record without dynamodb.OldImage"),
        ("NEW_AND_OLD_IMAGES", "REMOVE", "OldImage", "REMOVE record without dynamodb.OldImage"),
    ],
)
def test_streams_missing_required_image(view, event, drop, reason):
    record = streams_record(event, view=view)
    del record["dynamodb"][drop]
    assert reason in decode_error(decode_streams_record, record).reason


def test_streams_without_view_type_needs_the_event_images():
    record = streams_record("REMOVE")
    del record["dynamodb"]["StreamViewType"]
    assert decode_streams_record(record).old_value("status") == "CANCELLED"
    del record["dynamodb"]["OldImage"]
    assert decode_error(decode_streams_record, record).reason == "REMOVE record without dynamodb.OldImage"


def test_streams_unknown_view_type():
    record = streams_record()
    record["dynamodb"]["StreamViewType"] = "EVERYTHING"
    assert decode_error(decode_streams_record, record).reason == "unknown StreamViewType 'EVERYTHING'"


def test_streams_fractional_seconds_are_exact():
    change = decode_streams_record(orjson.dumps(streams_record(created_s=1721011165.89155)))
    assert change.created_us == DEFAULT_CREATED_US
    assert change.created_at == CREATED_AT


def test_streams_from_bytes_keeps_raw():
    data = orjson.dumps(streams_record())
    change = decode_streams_record(data)
    assert change.raw == data
    assert decode_streams_record(data.decode()).raw == data


def test_streams_explicit_position_wins():
    position = Position(SHARD, "42")
    assert decode_streams_record(streams_record(), position).position is position


def test_streams_without_sequence_number_has_no_position():
    record = streams_record()
    del record["dynamodb"]["SequenceNumber"]
    assert decode_streams_record(record).position is None


def test_streams_ttl_delete():
    assert decode_streams_record(streams_record("REMOVE", ttl=True)).ttl_delete is True
    assert decode_streams_record(streams_record("REMOVE")).ttl_delete is False


def test_streams_table_from_arn():
    record = streams_record(table="Orders-prod", region="eu-west-1")
    assert decode_streams_record(record).table == "Orders-prod"
    record["eventSourceARN"] = "arn:aws-cn:dynamodb:cn-north-1:123456789012:table/Legacy/stream/2020-01-01T00:00:00.000"
    assert decode_streams_record(record).table == "Legacy"


@pytest.mark.parametrize(
    "arn",
    ["not-an-arn", "arn:aws:kinesis:us-east-1:123456789012:stream/Orders", "arn:aws:dynamodb:us-east-1:123456789012:table/", ""],
)
def test_streams_bad_arn(arn):
    record = streams_record()
    record["eventSourceARN"] = arn
    assert "eventSourceARN" in decode_error(decode_streams_record, record).reason


def test_streams_record_as_boto3_client_returns_it():
    # dynamodbstreams.get_records: datetime timestamps, B as raw bytes.
    record = streams_record("INSERT", keys={"orderId": "ORD-0001"})
    record["dynamodb"]["ApproximateCreationDateTime"] = CREATED_AT
    record["dynamodb"]["NewImage"]["blob"] = {"B": b"\x00\xff"}
    change = decode_streams_record(record)
    assert change.created_us == DEFAULT_CREATED_US
    assert change.new_value("blob") == b"\x00\xff"
    assert b"2024-07-15T02:39:25.891550Z" in change.raw


def test_kds_decoder_rejects_a_streams_record_with_a_hint():
    err = decode_error(kds, streams_record())
    assert "DynamoDB Streams record" in err.reason


# ---------------------------------------------------------------------------------------------
# KCL records


def test_kcl_record():
    doc = kds_record("MODIFY")
    rec = kcl_record(doc, sequence_number(5), sub=2, arrival_ms=1721011166141)
    change = decode_kcl_record(rec, SHARD)
    assert change.position == Position(
        SHARD, sequence_number(5), 2, datetime(2024, 7, 15, 2, 39, 26, 141000, tzinfo=timezone.utc)
    )
    assert change.position.arrival.tzinfo is timezone.utc
    assert change.raw == orjson.dumps(doc)
    assert change.new_value("status") == "PAID"


def test_kcl_record_without_arrival_or_sub_sequence():
    rec = kcl_record(kds_record(), "1")
    del rec["approximateArrivalTimestamp"], rec["subSequenceNumber"]
    assert decode_kcl_record(rec, SHARD).position == Position(SHARD, "1", 0, None)


@pytest.mark.parametrize("data", ["not base64!!", "AAE", "ünïcode", "e30=\n"])
def test_kcl_record_bad_base64(data):
    rec = kcl_record(kds_record(), sequence_number(1))
    rec["data"] = data
    err = decode_error(decode_kcl_record, rec, SHARD)
    assert err.reason.startswith("record data is not valid base64")
    assert err.raw == data.encode()
    assert err.position == Position(SHARD, sequence_number(1), 0, err.position.arrival)


def test_kcl_record_data_not_json():
    rec = kcl_record(kds_record(), "1")
    rec["data"] = base64.b64encode(b"\x00garbage").decode()
    err = decode_error(decode_kcl_record, rec, SHARD)
    assert err.reason.startswith("record data is not JSON")
    assert err.raw == b"\x00garbage"
    assert err.position.sequence_number == "1"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: r.pop("sequenceNumber"), "missing field sequenceNumber"),
        (lambda r: r.pop("data"), "missing field data"),
        (lambda r: r.update(data=5), "field data must be a string, got int"),
        (lambda r: r.update(subSequenceNumber="1"), "field subSequenceNumber must be an integer"),
        (lambda r: r.update(approximateArrivalTimestamp="soon"), "approximateArrivalTimestamp must be a number"),
    ],
)
def test_kcl_record_malformed(mutate, reason):
    rec = kcl_record(kds_record(), "1")
    mutate(rec)
    assert reason in decode_error(decode_kcl_record, rec, SHARD).reason


def test_kcl_record_not_a_dict():
    assert decode_error(decode_kcl_record, ["x"], SHARD).reason == "KCL record must be an object, got list"


# ---------------------------------------------------------------------------------------------
# Bad input, every class


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty record data"),
        (b"not json", "record data is not JSON"),
        (b'{"eventName": "INSERT"', "record data is not JSON"),
        (b"\xff\xfe{}", "record data is not JSON"),
        (b"[1, 2]", "change record must be a JSON object, got list"),
        (b'"INSERT"', "change record must be a JSON object, got str"),
        (b"{}", "missing field eventName"),
    ],
)
def test_not_a_change_record(data, reason):
    err = decode_error(decode_kinesis_data, data)
    assert err.reason.startswith(reason)
    assert err.raw == data


def _without(path: str):
    def mutate(doc):
        *parents, leaf = path.split(".")
        target = doc
        for p in parents:
            target = target[p]
        del target[leaf]

    return mutate


def _set(path: str, value):
    def mutate(doc):
        *parents, leaf = path.split(".")
        target = doc
        for p in parents:
            target = target[p]
        target[leaf] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_without("eventName"), "missing field eventName"),
        (_without("tableName"), "missing field tableName"),
        (_without("eventID"), "missing field eventID"),
        (_without("dynamodb"), "missing field dynamodb"),
        (_without("dynamodb.Keys"), "missing field dynamodb.Keys"),
        (_set("eventName", "UPSERT"), "unknown eventName 'UPSERT' (expected INSERT, MODIFY or REMOVE)"),
        (_set("eventName", "modify"), "unknown eventName 'modify'"),
        (_set("eventName", 1), "field eventName must be a string, got int"),
        (_set("tableName", ["Orders"]), "field tableName must be a string, got list"),
        (_set("eventID", 7), "field eventID must be a string, got int"),
        (_set("dynamodb", "x"), "field dynamodb must be an object, got str"),
        (_set("dynamodb.Keys", []), "field dynamodb.Keys must be an object, got list"),
        (_set("dynamodb.Keys", {}), "field dynamodb.Keys is empty"),
        (_set("dynamodb.NewImage", "x"), "field dynamodb.NewImage must be an object, got str"),
        (_set("dynamodb.OldImage", [1]), "field dynamodb.OldImage must be an object, got list"),
        (_set("dynamodb.SizeBytes", "12"), "field dynamodb.SizeBytes must be a non-negative integer"),
        (_set("dynamodb.SizeBytes", -1), "field dynamodb.SizeBytes must be a non-negative integer"),
        (_set("userIdentity", "dynamodb"), "field userIdentity must be an object or null, got str"),
        (_set("eventSource", "aws:s3"), "eventSource is 'aws:s3', not 'aws:dynamodb'"),
        (_set("dynamodb.Keys", {"orderId": {"X": "1"}}), "dynamodb.Keys.orderId: unknown AttributeValue type 'X'"),
        (_set("dynamodb.Keys", {"orderNo": {"N": "1E+999"}}), "dynamodb.Keys.orderNo: N value '1E+999' is outside"),
        (_set("dynamodb.Keys", {"orderId": {"S": "a", "N": "1"}}), "dynamodb.Keys.orderId: AttributeValue must have exactly one type key"),
    ],
)
def test_bad_fields(mutate, reason):
    doc = kds_record("MODIFY")
    mutate(doc)
    data = orjson.dumps(doc)
    err = decode_error(decode_kinesis_data, data)
    assert err.reason.startswith(reason)
    assert str(err) == err.reason
    assert err.raw == data


@pytest.mark.parametrize(
    ("event", "drop", "reason"),
    [
        ("INSERT", "NewImage", "INSERT record without dynamodb.NewImage"),
        ("MODIFY", "NewImage", "MODIFY record without dynamodb.NewImage"),
        ("REMOVE", "OldImage", "REMOVE record without dynamodb.OldImage"),
    ],
)
def test_kds_missing_required_image(event, drop, reason):
    doc = kds_record(event)
    del doc["dynamodb"][drop]
    assert decode_error(kds, doc).reason == reason
    doc["dynamodb"][drop] = None  # an explicit null is as absent as a missing field
    assert decode_error(kds, doc).reason == reason


def test_kds_modify_without_old_image_is_accepted():
    # The brief requires only NewImage on MODIFY; transition routes then see old status None.
    doc = kds_record("MODIFY")
    del doc["dynamodb"]["OldImage"]
    assert kds(doc).old_value("status") is None


def test_position_travels_with_the_error():
    position = Position(SHARD, "9")
    err = decode_error(decode_kinesis_data, b"nope", position)
    assert err.position is position


def test_decode_error_pickles():
    err = DecodeError("bad", b"raw", Position(SHARD, "1"))
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.raw, back.position, str(back)) == ("bad", b"raw", Position(SHARD, "1"), "bad")


# ---------------------------------------------------------------------------------------------
# Images: lazy, validated on first access


def test_bad_image_surfaces_as_decode_error_on_access():
    doc = kds_record("MODIFY", new_av={**to_av(order_item(status="PAID")), "junk": {"N": "NaN"}})
    data = orjson.dumps(doc)
    position = Position(SHARD, "3")
    change = decode_kinesis_data(data, position)  # lazy: decode itself succeeds
    assert change.new_value("status") == "PAID"  # the attribute routing needs is fine
    with pytest.raises(DecodeError) as info:
        change.new_image
    assert info.value.reason == "NewImage.junk: N value 'NaN' is not a number literal"
    assert info.value.raw == data
    assert info.value.position is position
    with pytest.raises(DecodeError, match=r"^NewImage\.junk: "):
        change.new_value("junk")
    with pytest.raises(DecodeError, match=r"^NewImage\.junk: "):
        change.validate()


def test_bad_nested_old_image_path():
    old = to_av(order_item())
    old["lines"]["L"][0]["M"]["qty"] = {"INT": "2"}
    change = kds(kds_record("MODIFY", old_av=old))
    with pytest.raises(DecodeError) as info:
        change.old_value("lines")
    assert info.value.reason == "OldImage.lines[0].qty: unknown AttributeValue type 'INT'"


def test_new_value_decodes_only_that_attribute():
    image = to_av(order_item(status="SHIPPED"))
    image["unrelated"] = {"BOGUS": True}
    change = kds(kds_record("MODIFY", new_av=image))
    assert change.new_value("status") == "SHIPPED"
    assert change.new_value("missing", "dflt") == "dflt"


def test_images_are_decoded_once_and_cached():
    change = kds(kds_record("MODIFY"))
    first = change.new_image
    assert change.new_image is first
    assert change.old_image is change.old_image
    # Once decoded, single-attribute reads come from the cache.
    assert change.new_value("lines") is first["lines"]


def test_validate_passes_for_good_images():
    kds(kds_record("MODIFY")).validate()


def test_change_record_is_frozen():
    change = kds(kds_record())
    with pytest.raises(dataclasses.FrozenInstanceError):
        change.table = "Other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        change._new_image = {}  # type: ignore[misc]


def test_cache_does_not_affect_equality():
    a, b = kds(kds_record()), kds(kds_record())
    a.new_image
    assert a == b


# ---------------------------------------------------------------------------------------------
# item_key


def test_item_key_single():
    assert kds(kds_record(keys={"orderId": "ORD-1"})).item_key() == "orderId=ORD-1"


def test_item_key_is_sorted_and_stable():
    a = kds(kds_record(keys={"orderId": "ORD-1", "customerId": "C-1"}))
    doc = kds_record(keys={"orderId": "ORD-1", "customerId": "C-1"})
    doc["dynamodb"]["Keys"] = dict(reversed(list(doc["dynamodb"]["Keys"].items())))
    b = kds(doc)
    assert a.item_key() == b.item_key() == "customerId=C-1&orderId=ORD-1"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ({"n": Decimal("1.0")}, "n=1"),
        ({"n": Decimal("100")}, "n=100"),
        ({"n": Decimal("1E+2")}, "n=100"),
        ({"n": Decimal("-0")}, "n=0"),
        ({"n": Decimal("0.50")}, "n=0.5"),
        ({"n": Decimal("12345678901234567890123456789012345678")}, "n=12345678901234567890123456789012345678"),
        ({"s": "a&b=c%d"}, "s=a%26b%3Dc%25d"),
        ({"s": "ORD#1/x"}, "s=ORD#1/x"),
        ({"s": "ü"}, "s=%C3%BC"),
        ({"b": b"\xff\xfe"}, "b=//4%3D"),
    ],
)
def test_item_key_canonical_values(key, expected):
    assert kds(kds_record("INSERT", keys=key)).item_key() == expected


def test_item_key_is_unambiguous():
    one = kds(kds_record("INSERT", keys={"a": "x&b=y"})).item_key()
    two = kds(kds_record("INSERT", keys={"a": "x", "b": "y"})).item_key()
    assert one != two


def test_item_key_same_for_every_event_and_format():
    keys = {"orderId": "ORD-7"}
    got = {
        kds(kds_record("INSERT", keys=keys)).item_key(),
        kds(kds_record("REMOVE", keys=keys)).item_key(),
        decode_streams_record(streams_record("MODIFY", keys=keys, view="KEYS_ONLY")).item_key(),
    }
    assert got == {"orderId=ORD-7"}


# ---------------------------------------------------------------------------------------------
# decode_any


def test_decode_any_json():
    doc = kds_record("MODIFY")
    for line in (orjson.dumps(doc), orjson.dumps(doc).decode(), b"  " + orjson.dumps(doc) + b"\n"):
        change = decode_any(line)
        assert change.source is SourceFormat.KINESIS
        assert change.new_value("status") == "PAID"
        assert change.position is None


def test_decode_any_base64():
    data = orjson.dumps(kds_record("INSERT"))
    encoded = base64.b64encode(data)
    assert decode_any(encoded).raw == data
    wrapped = b"\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + b"\n"
    assert decode_any(wrapped.decode()).event is EventName.INSERT


def test_decode_any_streams():
    record = streams_record("REMOVE", ttl=True)
    change = decode_any(orjson.dumps(record))
    assert change.source is SourceFormat.STREAMS
    assert change.ttl_delete is True
    assert decode_any(base64.b64encode(orjson.dumps(record))).source is SourceFormat.STREAMS


def test_decode_any_lambda_event_with_one_record():
    event = {"Records": [streams_record("INSERT")]}
    assert decode_any(orjson.dumps(event)).event is EventName.INSERT
    event["Records"].append(streams_record("REMOVE"))
    assert decode_error(decode_any, orjson.dumps(event)).reason == "Lambda event must hold exactly one record to decode, got 2"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"", "empty input"),
        (b"   \n", "empty input"),
        (b"hello world!", "input is neither a JSON object nor base64"),
        (b"[1]", "input is neither a JSON object nor base64"),
        (b"{broken", "record data is not JSON"),
        (base64.b64encode(b"nope"), "record data is not JSON"),
        (b'{"eventName": "INSERT"}', "missing field tableName"),
    ],
)
def test_decode_any_bad(line, reason):
    assert decode_error(decode_any, line).reason.startswith(reason)


# ---------------------------------------------------------------------------------------------
# Output


def test_to_output_is_exact():
    new = order_item(
        status="SHIPPED",
        lines=[("SKU-1", 1, "12345678901234567890123456789012345678")],
        blob=b"\x00\xff",
        tags={"b", "a"},
    )
    change = kds(kds_record("MODIFY", new=new, ttl=False))
    out = to_output(change)
    assert set(out) == {"table", "event", "keys", "new", "old", "created_at", "ttl_delete"}
    written = dumps_exact(out)
    assert b'"price":12345678901234567890123456789012345678' in written
    assert b'"total":12345678901234567890123456789012345678' in written
    assert b'"created_at":"2024-07-15T02:39:25.891550Z"' in written
    assert b'"tags":["a","b"]' in written
    assert b'"blob":"AP8="' in written
    assert b'"event":"MODIFY"' in written
    assert b'"ttl_delete":false' in written


def test_to_output_of_remove_and_keys_only():
    out = to_output(decode_streams_record(streams_record("REMOVE", view="KEYS_ONLY")))
    assert out["new"] is None and out["old"] is None
    assert out["keys"] == {"orderId": "ORD-0001"}
    assert orjson.loads(dumps_exact(out))["event"] == "REMOVE"


# ---------------------------------------------------------------------------------------------
# Factories and sample files


@pytest.mark.parametrize("name", sorted(samples()))
def test_sample_files_are_current_and_decode(name):
    content = samples()[name]
    assert (SAMPLES_DIR / name).read_bytes() == sample_bytes(content), "run: python -m tests.factories"
    sample = load_sample(name)
    if name.startswith("kds_"):
        changes = [decode_kinesis_data(orjson.dumps(sample))]
    elif name.startswith("streams_"):
        changes = [decode_streams_record(sample)]
    else:
        changes = [decode_kcl_record(r, SHARD) for r in sample["records"]]
    for change in changes:
        change.validate()
        assert change.table == "Orders"


def test_factories_do_not_share_state():
    doc = kds_record()
    snapshot = copy.deepcopy(doc)
    doc["dynamodb"]["NewImage"]["status"] = av("X")
    assert kds_record() == snapshot


# ---------------------------------------------------------------------------------------------
# Fuzz: any corruption of a valid record is either still a record or a DecodeError, never a crash


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.sampled_from(["INSERT", "MODIFY", "REMOVE", "S", "N", "NaN", "1E+999", "MILLISECOND", "KEYS_ONLY"]),
    ),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=8,
)


def _corrupt(data: st.DataObject, doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    while True:
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        if not keys:
            return doc
        key = data.draw(st.sampled_from(keys))
        child = target[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            target = child
            continue
        if isinstance(target, dict) and data.draw(st.booleans()):
            del target[key]
        else:
            target[key] = data.draw(json_values)
        return doc


def _exercise(change: ChangeRecord) -> None:
    for use in (lambda: change.new_value("status"), lambda: change.old_value("lines"), change.validate, lambda: dumps_exact(to_output(change))):
        try:
            use()
        except DecodeError:
            pass
    change.item_key()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["INSERT", "MODIFY", "REMOVE"]), st.sampled_from([None, "MILLISECOND", "MICROSECOND"]))
def test_fuzz_kds(data, event, precision):
    doc = _corrupt(data, kds_record(event, precision=precision))
    try:
        _exercise(kds(doc))
    except DecodeError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["INSERT", "MODIFY", "REMOVE"]), st.sampled_from(["KEYS_ONLY", "NEW_IMAGE", "OLD_IMAGE", "NEW_AND_OLD_IMAGES"]))
def test_fuzz_streams(data, event, view):
    record = _corrupt(data, streams_record(event, view=view))
    for decode in (decode_streams_record, lambda r: decode_streams_record(orjson.dumps(r)), lambda r: decode_any(orjson.dumps(r))):
        try:
            _exercise(decode(record))
        except DecodeError:
            pass


@settings(max_examples=200)
@given(st.data())
def test_fuzz_kcl_record(data):
    rec = _corrupt(data, kcl_record(kds_record(), sequence_number(1)))
    try:
        _exercise(decode_kcl_record(rec, SHARD))
    except DecodeError:
        pass


@given(st.binary(max_size=64) | st.text(max_size=64))
def test_fuzz_decode_any_bytes(line):
    try:
        decode_any(line)
    except DecodeError:
        pass
