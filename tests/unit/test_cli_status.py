"""`orders-cdc status` against a real moto server (Kinesis over HTTP/1.1 is enough for the
command; the real daemon's view is in tests/integration/test_status_health.py), and its
one-line errors."""

from __future__ import annotations

import json
import time
import uuid

import boto3
import pytest

from orders_cdc import cli
from orders_cdc.local.stack import PROJECT_ROOT, free_port

PROPERTIES = str(PROJECT_ROOT / "app.properties")


@pytest.fixture
def world(moto_server, monkeypatch):
    suffix = uuid.uuid4().hex[:8]
    app, stream, queue = f"app-{suffix}", f"stream-{suffix}", f"dlq-{suffix}"
    env = {"AWS_ENDPOINT_URL": moto_server, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "ORDERS_CDC_APPLICATION": app, "ORDERS_CDC_STREAM": stream,
           "ORDERS_CDC_DLQ_QUEUE": queue}
    for name in [n for n in __import__("os").environ if n.startswith(("AWS_", "ORDERS_CDC_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def client(service):
        return boto3.client(service, endpoint_url=moto_server, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    return client, app, stream, queue


def make_leases(client, app, stream):
    kinesis, ddb = client("kinesis"), client("dynamodb")
    kinesis.create_stream(StreamName=stream, ShardCount=2)
    shards = [s["ShardId"] for s in kinesis.list_shards(StreamName=stream)["Shards"]]
    put = kinesis.put_record(StreamName=stream, Data=b"x", ExplicitHashKey="0", PartitionKey="p")
    assert put["ShardId"] == shards[0]
    ddb.create_table(TableName=app, BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}])
    ddb.put_item(TableName=app, Item={"leaseKey": {"S": shards[0]}, "leaseOwner": {"S": "w-1"},
                                      "leaseCounter": {"N": "7"}, "checkpoint": {"S": put["SequenceNumber"]},
                                      "checkpointSubSequenceNumber": {"N": "0"}})
    ddb.put_item(TableName=app, Item={"leaseKey": {"S": shards[1]}, "leaseOwner": {"S": "w-1"},
                                      "leaseCounter": {"N": "3"}, "checkpoint": {"S": "SHARD_END"},
                                      "parentShardId": {"SS": ["shardId-000000000099"]}})
    ddb.put_item(TableName=app, Item={"leaseKey": {"S": "Leader"}, "entityType": {"S": "LEADER"}})
    ddb.create_table(TableName=f"{app}-WorkerMetricStats", BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "wid", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "wid", "AttributeType": "S"}])
    for worker in ("w-1", "w-2"):
        ddb.put_item(TableName=f"{app}-WorkerMetricStats",
                     Item={"wid": {"S": worker}, "lut": {"N": str(int(time.time()))}})
    return shards, put


def test_status_json_shows_shards_workers_and_dead_letters(world, capsys):
    client, app, stream, queue = world
    shards, put = make_leases(client, app, stream)
    sqs = client("sqs")
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": i}))

    assert cli.main(["status", "--json", "--properties", PROPERTIES]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["stream"], doc["lease_table"]) == (stream, app)
    rows = {r["shard"]: r for r in doc["shards"]}
    assert set(rows) == set(shards)
    live, ended = rows[shards[0]], rows[shards[1]]
    assert (live["owner"], live["checkpoint"], live["state"], live["millis_behind"]) == ("w-1", put["SequenceNumber"], "open", 0)
    assert live["checkpoint_arrival"] is not None and live["error"] is None
    assert (ended["state"], ended["parents"], ended["millis_behind"]) == ("ended", ["shardId-000000000099"], 0)
    workers = {w["worker"]: w for w in doc["workers"]}
    assert workers["w-1"]["leases"] == 1, "a SHARD_END lease is not work"
    assert workers["w-2"]["leases"] == 0 and workers["w-2"]["reported_seconds_ago"] is not None
    letters = doc["dead_letters"]
    assert (letters["queue"], letters["visible"], letters["in_flight"]) == (queue, 3, 0)
    assert letters["oldest_age_seconds"] is None and "no CloudWatch datapoint" in letters["oldest_age_source"]
    # Reading the depth received nothing: the letters are all still there.
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "3"


def test_status_table(world, capsys):
    client, app, stream, queue = world
    shards, _ = make_leases(client, app, stream)
    assert cli.main(["status", "--properties", PROPERTIES]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"stream {stream}: 2 shard(s); lease table {app}"
    assert lines[1].split() == ["SHARD", "STATE", "OWNER", "CHECKPOINT", "CHECKPOINTED", "RECORD", "ARRIVED", "LAG",
                                "PARENTS"]
    assert lines[2].split()[:3] == [shards[0], "open", "w-1"] and lines[2].split()[-3:] == ["0", "ms", "-"]
    assert lines[3].split()[:3] == [shards[1], "ended", "w-1"]
    assert f"dead letters ({queue}): queue '{queue}' not found" in out


def test_missing_lease_table_is_one_line(world, capsys):
    client, app, stream, _ = world
    client("kinesis").create_stream(StreamName=stream, ShardCount=1)
    assert cli.main(["status", "--properties", PROPERTIES]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == f"orders-cdc: lease table {app!r} not found: has the consumer ever run?"
    assert "Traceback" not in captured.err


def test_missing_stream_is_one_line(world, capsys):
    client, app, stream, _ = world
    client("dynamodb").create_table(TableName=app, BillingMode="PAY_PER_REQUEST",
                                    KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                                    AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}])
    assert cli.main(["status", "--properties", PROPERTIES]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"orders-cdc: stream {stream!r} not found"


@pytest.mark.parametrize("command", [["status"], ["status", "--json"],
                                     ["replay", "--from", "2026-01-01T00:00:00Z", "--force"]])
def test_unreachable_endpoint_is_one_line(world, monkeypatch, capsys, command):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    assert cli.main([*command, "--properties", PROPERTIES]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith("{")]
    assert lines == [f"orders-cdc: cannot reach {dead}/: is the endpoint right, and the service up?"], captured.err
    assert "Traceback" not in captured.err
