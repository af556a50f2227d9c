"""bench.fakeaws answers every operation the code calls in a way real boto3 clients accept."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    stats = tmp_path_factory.mktemp("fakeaws") / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.fakeaws", "--port", "0", "--profile", "zero",
                             "--stats-out", str(stats)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", proc, stats
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _client(url: str, service: str):
    return boto3.session.Session().client(
        service, region_name="us-east-1", endpoint_url=url, aws_access_key_id="bench", aws_secret_access_key="bench",
        config=Config(retries={"max_attempts": 1}))


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/__stats", timeout=5) as reply:
        return json.loads(reply.read())


def test_every_operation_through_boto3(fake):
    url, proc, stats_path = fake
    ddb = _client(url, "dynamodb")
    key = {"id": {"S": "k"}}
    got = ddb.batch_get_item(RequestItems={"A": {"Keys": [key]}, "B": {"Keys": [key]}})
    assert got["Responses"] == {"A": [], "B": []} and got["UnprocessedKeys"] == {}
    assert "Item" not in ddb.get_item(TableName="A", Key=key)
    ddb.put_item(TableName="A", Item=key, ConditionExpression="attribute_not_exists(id)")
    ddb.update_item(TableName="A", Key=key, UpdateExpression="SET v = :v", ExpressionAttributeValues={":v": {"N": "1"}})
    ddb.delete_item(TableName="A", Key=key)
    assert ddb.batch_write_item(RequestItems={"A": [{"PutRequest": {"Item": key}}]})["UnprocessedItems"] == {}
    ddb.transact_write_items(TransactItems=[{"Put": {"TableName": "A", "Item": key}}])
    assert len(ddb.transact_get_items(TransactItems=[{"Get": {"TableName": "A", "Key": key}}])["Responses"]) == 1
    assert ddb.query(TableName="A", KeyConditionExpression="id = :k",
                     ExpressionAttributeValues={":k": {"S": "k"}})["Items"] == []
    assert ddb.describe_table(TableName="A")["Table"]["TableStatus"] == "ACTIVE"

    sqs = _client(url, "sqs")
    queue = sqs.get_queue_url(QueueName="q")["QueueUrl"]
    assert queue == f"{url}/000000000000/q"
    sent = sqs.send_message(QueueUrl=queue, MessageBody="hello",
                            MessageAttributes={"a": {"DataType": "String", "StringValue": "x"}})
    assert sent["MD5OfMessageBody"] == hashlib.md5(b"hello").hexdigest()
    batch = sqs.send_message_batch(QueueUrl=queue, Entries=[{"Id": "1", "MessageBody": "a"}, {"Id": "2", "MessageBody": "b"}])
    assert [e["Id"] for e in batch["Successful"]] == ["1", "2"] and not batch.get("Failed")
    assert batch["Successful"][1]["MD5OfMessageBody"] == hashlib.md5(b"b").hexdigest()

    ses = _client(url, "ses")
    assert ses.send_email(Source="a@example.com", Destination={"ToAddresses": ["b@example.com"]},
                          Message={"Subject": {"Data": "s"}, "Body": {"Text": {"Data": "t"}}})["MessageId"]

    firehose = _client(url, "firehose")
    put = firehose.put_record_batch(DeliveryStreamName="f", Records=[{"Data": b"1"}, {"Data": b"2"}, {"Data": b"3"}])
    assert put["FailedPutCount"] == 0 and len(put["RequestResponses"]) == 3
    assert firehose.put_record(DeliveryStreamName="f", Record={"Data": b"1"})["RecordId"]

    with pytest.raises(ddb.exceptions.ClientError) as err:
        ddb.list_tables()
    assert "ListTables" in str(err.value)

    stats = _stats(url)
    assert stats["calls"]["dynamodb.BatchGetItem"] == 1
    assert stats["calls"]["ses.SendEmail"] == 1
    assert stats["calls"]["sqs.SendMessageBatch"] == 1
    assert stats["calls"]["firehose.PutRecordBatch"] == 1
    assert stats["unknown_operations"] == {"dynamodb.ListTables": 1}
    assert stats["max_in_flight"] >= 1

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert json.loads(stats_path.read_text())["total_calls"] == stats["total_calls"]


def test_delays_overlap():
    from bench.fakeaws import delay_seconds

    assert delay_seconds("zero", "ses", "SendEmail") == 0
    assert delay_seconds("aws", "dynamodb", "GetItem") == 0.006
    assert delay_seconds("aws", "dynamodb", "TransactWriteItems") == 0.012
    assert delay_seconds("aws-p99", "ses", "SendEmail") == pytest.approx(0.18)
