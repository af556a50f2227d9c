"""`orders-cdc dlq list | redrive` against a real moto server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from orders_cdc.deadletter import DeadLetter, SqsDeadLetterSink
from tests.factories import kcl_record, kds_record, sequence_number

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(moto_resources):
    names, clients, created, env = moto_resources
    return names, clients, created, {**env, "ORDERS_CDC_MAX_ATTEMPTS": "1"}


def cli(env, *args):
    proc = subprocess.run([sys.executable, "-m", "orders_cdc.cli", "dlq", *args], env=env, cwd=ROOT,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return [orjson.loads(line) for line in proc.stdout.splitlines()]


def queue_depth(clients, url):
    attrs = clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                                                           "ApproximateNumberOfMessagesNotVisible"])
    return sum(int(v) for v in attrs["Attributes"].values())


def analytics_for(clients, bucket, order_id):
    found = []
    for obj in clients.s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        for line in clients.s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().splitlines():
            event = orjson.loads(line)
            if event.get("record_type") == "analytics" and event["keys"] == {"order_id": order_id}:
                found.append(event)
    return found


def test_list_then_redrive(stack):
    names, clients, created, env = stack
    url = created.queue_urls[names.dlq_queue]
    good = kcl_record(kds_record("INSERT", new={"order_id": "r-1", "status": "pending"}, old=None,
                                 keys={"order_id": "r-1"}, table=names.orders_table), sequence_number(1))
    poison = {**kcl_record({}, sequence_number(2)), "data": "bm90IGpzb24="}  # base64 of "not json"
    letters = [DeadLetter(record=r, shard_id="shardId-000000000000", sequence_number=r["sequenceNumber"],
                          sub_sequence_number=0, reason=reason, error_type="X", attempts=5)
               for r, reason in ((good, "downstream was down"), (poison, "not JSON"))]
    SqsDeadLetterSink(clients.sqs, url).send(letters)

    listed = cli(env, "list")
    assert sorted(l["reason"] for l in listed) == ["downstream was down", "not JSON"]
    assert queue_depth(clients, url) == 2, "listing takes nothing away"

    redriven = cli(env, "redrive")
    outcomes = {o["sequence_number"]: o["now"] for o in redriven}
    assert len(redriven) == 2, "each letter once: the poison record's new letter is not taken again"
    assert outcomes[sequence_number(1)] == "done"
    assert outcomes[sequence_number(2)].startswith("dead-lettered again:")
    assert len(analytics_for(clients, names.analytics_bucket, "r-1")) == 1
    [again] = cli(env, "list", "--records")
    assert again["sequence_number"] == sequence_number(2) and again["record"] == poison
    assert queue_depth(clients, url) == 1


def test_a_letter_kept_in_s3_is_listed_and_redriven_whole(stack):
    names, clients, created, env = stack
    url = created.queue_urls[names.dlq_queue]
    # Both images near DynamoDB's 400 KB item limit: over SQS's 1 MiB once in base64.
    old = {"order_id": "r-9", "status": "pending", "notes": "x" * 400_000}
    new = {**old, "status": "processing", "notes": "y" * 400_000}
    record = kcl_record(kds_record("MODIFY", new=new, old=old, keys={"order_id": "r-9"}, table=names.orders_table),
                        sequence_number(9))
    letter = DeadLetter(record=record, shard_id="shardId-000000000000", sequence_number=record["sequenceNumber"],
                        sub_sequence_number=0, reason="downstream was down", error_type="X", attempts=5)
    SqsDeadLetterSink(clients.sqs, url, clients.s3, names.dead_letter_bucket).send([letter])
    [listed] = cli(env, "list", "--records")
    assert listed["record_s3"]["bucket"] == names.dead_letter_bucket and listed["record"] == record
    [outcome] = cli(env, "redrive")
    assert outcome["now"] == "done"
    assert len(analytics_for(clients, names.analytics_bucket, "r-9")) == 1
