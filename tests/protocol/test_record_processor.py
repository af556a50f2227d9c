"""record_processor.py as the daemon runs it: a subprocess fed scripted daemon lines on
stdin, its stdout read back line by line. Downstream AWS is a real moto server."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest

from tests.factories import kcl_record, kds_record, sequence_number

ROOT = Path(__file__).resolve().parents[2]


class Child:
    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "record_processor.py")], env=env, cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue = queue.Queue()
        self.raw_stdout: list[bytes] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.raw_stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def send(self, message: dict) -> None:
        self.proc.stdin.write(orjson.dumps(message) + b"\n")
        self.proc.stdin.flush()

    def expect(self, timeout: float = 30) -> dict | None:
        line = self.lines.get(timeout=timeout)
        return None if line is None else orjson.loads(line)

    def close(self, timeout: float = 20) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout)


@pytest.fixture
def downstream(moto_resources):
    names, clients, created, env = moto_resources
    env = {**env, "ORDERS_CDC_CHECKPOINT_EVERY_RECORDS": "1", "ORDERS_CDC_MAX_ATTEMPTS": "2",
           "ORDERS_CDC_RETRY_BASE_SECONDS": "0.01"}
    return names, clients, created, env


def analytics_events(clients, bucket):
    events = []
    for obj in clients.s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        body = clients.s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        events += [orjson.loads(line) for line in body.splitlines() if line.strip()]
    return [e for e in events if e.get("record_type", "analytics") == "analytics"]


def dead_letters(clients, url):
    messages = clients.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    return [orjson.loads(m["Body"]) for m in messages]


def orders_batch(table):
    docs = [
        kds_record("INSERT", new={"order_id": "o-1", "status": "pending"}, old=None, keys={"order_id": "o-1"}, table=table),
        kds_record("MODIFY", new={"order_id": "o-1", "status": "shipped"}, old={"order_id": "o-1", "status": "pending"},
                   keys={"order_id": "o-1"}, table=table, created_us=1721011166000000),
    ]
    records = [kcl_record(docs[0], sequence_number(1)), kcl_record({}, sequence_number(2)), kcl_record(docs[1], sequence_number(3))]
    records[1]["data"] = "not base64 at all!"
    return records


def test_batch_is_handled_dead_lettered_and_checkpointed(downstream):
    names, clients, created, env = downstream
    child = Child(env)
    child.send({"action": "initialize", "shardId": "shardId-000000000000", "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0})
    assert child.expect() == {"action": "status", "responseFor": "initialize"}

    records = orders_batch(names.orders_table)
    child.send({"action": "processRecords", "records": records, "millisBehindLatest": 0})
    assert child.expect() == {"action": "checkpoint", "sequenceNumber": sequence_number(3), "subSequenceNumber": 0}
    child.send({"action": "checkpoint", "sequenceNumber": sequence_number(3), "subSequenceNumber": 0, "error": None})
    assert child.expect() == {"action": "status", "responseFor": "processRecords"}

    child.send({"action": "shutdownRequested"})
    assert child.expect() == {"action": "status", "responseFor": "shutdownRequested"}, "nothing new to checkpoint"
    child.send({"action": "leaseLost"})
    assert child.expect() == {"action": "status", "responseFor": "leaseLost"}
    assert child.close() == 0
    assert child.expect() is None

    # stdout carried the protocol and nothing else
    assert all(orjson.loads(line)["action"] in ("status", "checkpoint") for line in child.raw_stdout if line.strip())

    events = analytics_events(clients, names.analytics_bucket)
    assert [(e["event_name"], e["event_type"], e["item"]["status"], e["sequence_number"]) for e in events] == [
        ("INSERT", "order_created", "pending", sequence_number(1)),
        ("MODIFY", "order_shipped", "shipped", sequence_number(3)),
    ]
    [letter] = dead_letters(clients, created.queue_urls[names.dlq_queue])
    assert letter["sequence_number"] == sequence_number(2)
    assert letter["record"] == records[1]
    assert "base64" in letter["reason"]


def test_checkpoint_throttled_then_retried(downstream):
    names, clients, created, env = downstream
    child = Child(env)
    child.send({"action": "initialize", "shardId": "shardId-000000000000", "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0})
    child.expect()
    records = orders_batch(names.orders_table)[:1]
    child.send({"action": "processRecords", "records": records, "millisBehindLatest": 0})
    assert child.expect()["action"] == "checkpoint"
    child.send({"action": "checkpoint", "sequenceNumber": None, "subSequenceNumber": None, "error": "ThrottlingException"})
    assert child.expect(timeout=30) == {"action": "checkpoint", "sequenceNumber": sequence_number(1), "subSequenceNumber": 0}
    child.send({"action": "checkpoint", "sequenceNumber": sequence_number(1), "subSequenceNumber": 0, "error": None})
    assert child.expect() == {"action": "status", "responseFor": "processRecords"}
    assert child.close() == 0


def test_shard_end_checkpoints_shard_end(downstream):
    names, clients, created, env = downstream
    child = Child(env)
    child.send({"action": "initialize", "shardId": "shardId-000000000000", "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0})
    child.expect()
    child.send({"action": "shardEnded"})
    assert child.expect() == {"action": "checkpoint", "sequenceNumber": None, "subSequenceNumber": None}
    child.send({"action": "checkpoint", "sequenceNumber": "SHARD_END", "subSequenceNumber": None, "error": None})
    assert child.expect() == {"action": "status", "responseFor": "shardEnded"}
    assert child.close() == 0


def test_unrecoverable_batch_exits_without_acknowledging(downstream):
    """The DLQ disappears: the poison record can be neither handled nor dead-lettered,
    so the child must exit non-zero and never send status (the daemon then restarts)."""
    names, clients, created, env = downstream
    child = Child({**env, "ORDERS_CDC_CHECKPOINT_EVERY_RECORDS": "1000"})
    child.send({"action": "initialize", "shardId": "shardId-000000000000", "sequenceNumber": "TRIM_HORIZON", "subSequenceNumber": 0})
    child.expect()
    clients.sqs.delete_queue(QueueUrl=created.queue_urls[names.dlq_queue])
    child.send({"action": "processRecords", "records": orders_batch(names.orders_table), "millisBehindLatest": 0})
    assert child.expect(timeout=120) is None, "no status, no checkpoint"
    assert child.proc.wait(30) == 1
    assert b"exiting without acknowledging" in child.proc.stderr.read()


def test_bad_setting_fails_at_start_in_one_line(downstream):
    _, _, _, env = downstream
    env = {k: v for k, v in env.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    proc = subprocess.run([sys.executable, str(ROOT / "record_processor.py")], env=env, input=b"", capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert proc.stderr.decode().strip().splitlines() == ["orders-cdc: AWS_REGION is not set (e.g. AWS_REGION=us-east-1)"]
