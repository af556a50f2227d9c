"""The local DynamoDB Stream -> Kinesis bridge, against a real moto server (Kinesis included)."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError

from orders_cdc.local.bridge import StreamBridge, partition_key

TOP_LEVEL = ["awsRegion", "eventID", "eventName", "userIdentity", "recordFormat", "tableName",
             "dynamodb", "eventSource"]
HEX32 = re.compile(r"^[0-9A-F]{32}$")


@pytest.fixture
def aws(moto_server: str) -> dict[str, Any]:
    kw = dict(endpoint_url=moto_server, region_name="us-east-1",
              aws_access_key_id="test", aws_secret_access_key="test")
    return {n: boto3.client(n, **kw) for n in ("dynamodb", "dynamodbstreams", "kinesis")}  # type: ignore[call-overload]


@pytest.fixture
def names(aws: dict[str, Any]) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    table, stream = f"Orders-{suffix}", f"orders-cdc-{suffix}"
    aws["dynamodb"].create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "order_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "order_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    aws["kinesis"].create_stream(StreamName=stream, ShardCount=2)
    aws["kinesis"].get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 0.1})
    yield table, stream
    aws["dynamodb"].delete_table(TableName=table)
    aws["kinesis"].delete_stream(StreamName=stream)


def make_bridge(aws: dict[str, Any], names: tuple[str, str], **kw: Any) -> StreamBridge:
    return StreamBridge(aws["dynamodbstreams"], aws["dynamodb"], aws["kinesis"], *names, **kw)


def pump_until(bridge: StreamBridge, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while bridge.forwarded < count:
        assert time.monotonic() < deadline, f"forwarded {bridge.forwarded}/{count}"
        bridge.pump_once()


def read_stream(kinesis: Any, stream: str) -> list[dict[str, Any]]:
    """Every record, per shard in sequence order, with shard id and decoded payload."""
    out = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            resp = kinesis.get_records(ShardIterator=it)
            for r in resp["Records"]:
                out.append({"shard": shard["ShardId"], "pk": r["PartitionKey"],
                            "seq": int(r["SequenceNumber"]), "payload": json.loads(r["Data"])})
            it = resp.get("NextShardIterator") if resp["Records"] else None
    return out


def item_events(records: list[dict[str, Any]], order_id: str) -> list[dict[str, Any]]:
    mine = [r for r in records if r["payload"]["dynamodb"]["Keys"] == {"order_id": {"S": order_id}}]
    return sorted(mine, key=lambda r: r["seq"])


def test_exact_kds_for_ddb_format(aws: dict[str, Any], names: tuple[str, str]) -> None:
    table, stream = names
    ddb = aws["dynamodb"]
    t0 = datetime.now(timezone.utc)
    ddb.put_item(TableName=table, Item={"order_id": {"S": "o-1"}, "status": {"S": "placed"},
                                       "total": {"N": "12.50"}, "blob": {"B": b"\x00\xff"}})
    ddb.update_item(TableName=table, Key={"order_id": {"S": "o-1"}},
                    UpdateExpression="SET #s = :s", ExpressionAttributeNames={"#s": "status"},
                    ExpressionAttributeValues={":s": {"S": "shipped"}})
    ddb.put_item(TableName=table, Item={"order_id": {"S": "o-2"}, "status": {"S": "placed"}})
    ddb.delete_item(TableName=table, Key={"order_id": {"S": "o-1"}})
    t1 = datetime.now(timezone.utc)

    bridge = make_bridge(aws, names)
    pump_until(bridge, 4)
    assert bridge.pump_once() == 0 and bridge.read == 4 and bridge.pending == 0
    records = read_stream(aws["kinesis"], stream)
    assert len(records) == 4

    for r in records:
        p = r["payload"]
        assert list(p) == TOP_LEVEL
        assert p["awsRegion"] == "us-east-1"
        assert str(uuid.UUID(p["eventID"])) == p["eventID"] and uuid.UUID(p["eventID"]).version == 4
        assert p["userIdentity"] is None
        assert p["recordFormat"] == "application/json"
        assert p["tableName"] == table
        assert p["eventSource"] == "aws:dynamodb"
        d = p["dynamodb"]
        assert d["ApproximateCreationDateTimePrecision"] == "MICROSECOND"
        ts = d["ApproximateCreationDateTime"]
        assert isinstance(ts, int) and len(str(ts)) == 16
        # moto's stream time is whole milliseconds at best; allow that and the per-item bump.
        assert int(t0.timestamp() * 1e6) - 1000 <= ts <= int(t1.timestamp() * 1e6) + 1000
        assert isinstance(d["SizeBytes"], int) and d["SizeBytes"] > 0
        assert not {"SequenceNumber", "StreamViewType"} & set(d)
        assert r["pk"] == partition_key(d["Keys"]) and HEX32.match(r["pk"])
    assert len({r["payload"]["eventID"] for r in records}) == 4

    o1 = item_events(records, "o-1")
    assert [r["payload"]["eventName"] for r in o1] == ["INSERT", "MODIFY", "REMOVE"]
    assert len({r["pk"] for r in o1}) == 1 and len({r["shard"] for r in o1}) == 1
    times = [r["payload"]["dynamodb"]["ApproximateCreationDateTime"] for r in o1]
    assert times == sorted(times) and len(set(times)) == 3
    insert, modify, remove = (r["payload"]["dynamodb"] for r in o1)
    assert list(insert) == ["ApproximateCreationDateTime", "ApproximateCreationDateTimePrecision",
                            "Keys", "NewImage", "SizeBytes"]
    assert insert["NewImage"] == {"order_id": {"S": "o-1"}, "status": {"S": "placed"},
                                  "total": {"N": "12.50"}, "blob": {"B": "AP8="}}
    assert list(modify) == ["ApproximateCreationDateTime", "ApproximateCreationDateTimePrecision",
                            "Keys", "NewImage", "OldImage", "SizeBytes"]
    assert modify["OldImage"]["status"] == {"S": "placed"}
    assert modify["NewImage"]["status"] == {"S": "shipped"}
    assert "NewImage" not in remove and remove["OldImage"]["status"] == {"S": "shipped"}

    (o2,) = item_events(records, "o-2")
    assert o2["pk"] != o1[0]["pk"]


def test_millisecond_precision(aws: dict[str, Any], names: tuple[str, str]) -> None:
    table, stream = names
    before = int(time.time() * 1000)
    for status in ("placed", "paid", "shipped"):  # same millisecond is likely: bump must apply
        aws["dynamodb"].put_item(TableName=table, Item={"order_id": {"S": "o-ms"}, "status": {"S": status}})
    bridge = make_bridge(aws, names, precision="MILLISECOND")
    pump_until(bridge, 3)
    events = item_events(read_stream(aws["kinesis"], stream), "o-ms")
    times = [e["payload"]["dynamodb"]["ApproximateCreationDateTime"] for e in events]
    assert all(e["payload"]["dynamodb"]["ApproximateCreationDateTimePrecision"] == "MILLISECOND"
               for e in events)
    assert all(len(str(t)) == 13 and before - 1 <= t <= int(time.time() * 1000) + 3 for t in times)
    assert times == sorted(times) and len(set(times)) == 3
    with pytest.raises(ValueError):
        make_bridge(aws, names, precision="SECOND")  # type: ignore[arg-type]


class FlakyKinesis:
    """Rejects every other entry of the first `bad_calls` PutRecords calls, as throttling would."""

    def __init__(self, real: Any, bad_calls: int) -> None:
        self.real, self.bad_calls, self.calls = real, bad_calls, 0

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls += 1
        if self.calls > self.bad_calls:
            return self.real.put_records(StreamName=StreamName, Records=Records)
        ok = Records[1::2]
        sent = iter(self.real.put_records(StreamName=StreamName, Records=ok)["Records"] if ok else [])
        failure = {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow down"}
        results = [next(sent) if i % 2 else failure for i in range(len(Records))]
        return {"FailedRecordCount": sum(1 for r in results if "ErrorCode" in r), "Records": results}


def test_partial_put_failures_lose_nothing_and_keep_item_order(
    aws: dict[str, Any], names: tuple[str, str],
) -> None:
    table, stream = names
    for step in range(10):
        for item in ("a", "b", "c"):
            aws["dynamodb"].put_item(TableName=table, Item={"order_id": {"S": item}, "step": {"N": str(step)}})
    flaky = FlakyKinesis(aws["kinesis"], bad_calls=6)
    bridge = StreamBridge(aws["dynamodbstreams"], aws["dynamodb"], flaky, *names, retry_delay=0.001)
    pump_until(bridge, 30)
    assert bridge.retried > 0 and flaky.calls > 6
    records = read_stream(aws["kinesis"], stream)
    assert len(records) == 30  # none lost, none doubled
    for item in ("a", "b", "c"):
        steps = [int(r["payload"]["dynamodb"]["NewImage"]["step"]["N"]) for r in item_events(records, item)]
        assert steps == list(range(10))


class FakeStreams:
    """A DynamoDB Streams client serving fixed records, with AWS's whole-second times."""

    meta = type("Meta", (), {"region_name": "eu-west-1"})()

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def describe_stream(self, StreamArn: str) -> dict[str, Any]:
        return {"StreamDescription": {"Shards": [
            {"ShardId": "shard-1", "SequenceNumberRange": {"StartingSequenceNumber": "1"}}]}}

    def get_shard_iterator(self, **kw: Any) -> dict[str, Any]:
        return {"ShardIterator": "0"}

    def get_records(self, ShardIterator: str, Limit: int) -> dict[str, Any]:
        start = int(ShardIterator)
        return {"Records": self.records[start:start + Limit], "NextShardIterator": str(len(self.records))}


def test_whole_second_times_are_bumped_per_item_and_ttl_identity_kept(
    aws: dict[str, Any], names: tuple[str, str],
) -> None:
    table, stream = names
    second = datetime(2024, 7, 15, 2, 39, 25, tzinfo=timezone.utc)

    def rec(n: int, name: str, item: str, **extra: Any) -> dict[str, Any]:
        images = {"OldImage": {"order_id": {"S": item}}} if name == "REMOVE" else {"NewImage": {"order_id": {"S": item}}}
        return {"eventName": name, "awsRegion": "eu-west-1", **extra, "dynamodb": {
            "ApproximateCreationDateTime": second, "Keys": {"order_id": {"S": item}},
            "SequenceNumber": str(n), "SizeBytes": 20, **images}}

    ttl = {"userIdentity": {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}}
    fake = FakeStreams([rec(1, "INSERT", "x"), rec(2, "INSERT", "y"), rec(3, "MODIFY", "x"),
                        rec(4, "REMOVE", "x", **ttl)])
    bridge = StreamBridge(fake, aws["dynamodb"], aws["kinesis"], *names)
    pump_until(bridge, 4)
    records = read_stream(aws["kinesis"], stream)
    base = int(second.timestamp()) * 1_000_000
    x = item_events(records, "x")
    assert [r["payload"]["dynamodb"]["ApproximateCreationDateTime"] for r in x] == [base, base + 1, base + 2]
    assert item_events(records, "y")[0]["payload"]["dynamodb"]["ApproximateCreationDateTime"] == base
    assert x[2]["payload"]["userIdentity"] == {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    assert x[0]["payload"]["userIdentity"] is None
    assert x[0]["payload"]["awsRegion"] == "eu-west-1"


def test_latest_skips_old_changes_and_run_stops(aws: dict[str, Any], names: tuple[str, str]) -> None:
    table, stream = names
    ddb = aws["dynamodb"]
    ddb.put_item(TableName=table, Item={"order_id": {"S": "old"}})
    bridge = make_bridge(aws, names, start_position="LATEST", poll_interval=0.05)
    bridge.pump_once()  # positions the iterators at LATEST
    stop = threading.Event()
    worker = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    worker.start()
    try:
        ddb.put_item(TableName=table, Item={"order_id": {"S": "new"}})
        deadline = time.monotonic() + 10
        while bridge.forwarded < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    records = read_stream(aws["kinesis"], stream)
    assert [r["payload"]["dynamodb"]["Keys"]["order_id"]["S"] for r in records] == ["new"]


class DownKinesis:
    """Raises on the first `down_calls` PutRecords calls, as an unreachable endpoint would."""

    def __init__(self, real: Any, down_calls: int) -> None:
        self.real, self.down_calls, self.calls = real, down_calls, 0

    def put_records(self, **kw: Any) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.down_calls:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return self.real.put_records(**kw)


def test_changes_wait_in_memory_while_kinesis_is_down(aws: dict[str, Any], names: tuple[str, str]) -> None:
    table, stream = names
    for item in ("p", "q"):
        aws["dynamodb"].put_item(TableName=table, Item={"order_id": {"S": item}})
    down = DownKinesis(aws["kinesis"], down_calls=3)
    bridge = StreamBridge(aws["dynamodbstreams"], aws["dynamodb"], down, *names,
                          max_put_attempts=2, retry_delay=0.001)
    assert bridge.pump_once() == 0 and bridge.pending == 2 and bridge.read == 2
    assert bridge.pump_once() == 2 and bridge.pending == 0
    assert bridge.read == 2  # nothing read twice: the held changes were sent, not re-read
    records = read_stream(aws["kinesis"], stream)
    assert sorted(r["payload"]["dynamodb"]["Keys"]["order_id"]["S"] for r in records) == ["p", "q"]
