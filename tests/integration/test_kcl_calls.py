"""The KCL's own DynamoDB calls, recorded on a real daemon run: none outside what the task role
grants it (tests/unit/test_iam.py takes the KCL's grants from its documented list; this run
checks that list against what the daemon really does).

moto's request recorder (MOTO_ENABLE_RECORDING) writes every request the moto server
receives; the daemon's are those whose User-Agent is the AWS SDK for Java's. The run: start
the local stack and the daemon, one order through to the processor, then SIGTERM (as ECS
stops a task), so the start, the lease taking, checkpointing and the shutdown are in it.
Its Kinesis calls go to LocalStack; tests/unit/test_iam.py derives those from the jars.
"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from pathlib import Path

import pytest
from boto3.dynamodb.types import TypeSerializer

from orders_cdc.local.orders import OrderDemo
from orders_cdc.local.runner import LocalRun, LocalRunConfig, wait_until
from orders_cdc.local.stack import PROJECT_ROOT, LocalStackConfig, free_port
from tests.unit.test_iam import KCL_COORDINATOR_AND_WORKER_METRICS, KCL_LEASE_INDEX, KCL_LEASE_TABLE

pytestmark = pytest.mark.integration
ROOT = PROJECT_ROOT / ".local" / "test-kcl-calls"


def _kcl_dynamodb_calls(recording: Path) -> dict[str, set[str]]:
    """{table (or table/index/name): {operation}} of the Java SDK's requests to moto."""
    calls: dict[str, set[str]] = defaultdict(set)
    for line in recording.read_text().splitlines():
        entry = json.loads(line)
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        target = headers.get("x-amz-target", "")
        if "aws-sdk-java" not in headers.get("user-agent", "") or not target.startswith("DynamoDB_"):
            continue
        operation = target.split(".", 1)[1]
        raw = base64.b64decode(entry["body"]) if entry.get("body_encoded") else (entry["body"] or "").encode()
        body = json.loads(raw or b"{}")
        if operation == "TransactWriteItems":
            for item in body.get("TransactItems", []):
                ((kind, inner),) = item.items()
                calls[inner["TableName"]].add({"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                                               "ConditionCheck": "ConditionCheckItem"}[kind])
        elif operation in ("BatchWriteItem", "BatchGetItem"):
            for table in body.get("RequestItems", {}):
                calls[table].add(operation)
        else:
            table = body.get("TableName", "?")
            calls[table + (f"/index/{body['IndexName']}" if body.get("IndexName") else "")].add(operation)
    return calls


def test_the_daemons_dynamodb_calls_are_the_documented_ones(monkeypatch):
    recording = ROOT / "moto-recording.jsonl"
    recording.parent.mkdir(parents=True, exist_ok=True)
    recording.unlink(missing_ok=True)
    # The moto server inherits these (orders_cdc.local.stack drops only AWS_*, PYTHON*).
    monkeypatch.setenv("MOTO_ENABLE_RECORDING", "True")
    monkeypatch.setenv("MOTO_RECORDER_FILEPATH", str(recording))
    cfg = LocalRunConfig(stack=LocalStackConfig(root=ROOT, moto_port=free_port(), localstack_port=free_port()),
                         application=f"kcl-calls-{int(time.time())}")
    run = LocalRun(cfg)
    run.start()
    try:
        ddb, ser = run.client("dynamodb"), TypeSerializer()
        item = OrderDemo(seed=3, prefix="kcl").step()[1]
        ddb.put_item(TableName=cfg.names.orders_table, Item={k: ser.serialize(v) for k, v in item.items()})
        s3 = run.client("s3")
        wait_until(lambda: s3.list_objects_v2(Bucket=cfg.names.analytics_bucket).get("Contents"), 240, 1.0,
                   "the change to reach the processor")
    finally:
        run.stop()  # SIGTERM: the shutdown's checkpoints and lease handling are recorded too

    calls = _kcl_dynamodb_calls(recording)
    app = cfg.application
    assert calls.get(app), f"no call of the daemon to its lease table recorded: {dict(calls)}"
    allowed = {app: set(KCL_LEASE_TABLE), f"{app}-CoordinatorState": set(KCL_COORDINATOR_AND_WORKER_METRICS),
               f"{app}-WorkerMetricStats": set(KCL_COORDINATOR_AND_WORKER_METRICS)}
    outside = {}
    for table, operations in calls.items():
        if table.startswith(f"{app}/index/"):
            extra = operations - set(KCL_LEASE_INDEX)
        else:
            extra = operations - allowed.get(table, set())
        if extra:
            outside[table] = sorted(extra)
    print("KCL_CALLS", json.dumps({t: sorted(o) for t, o in sorted(calls.items())}))
    assert outside == {}, "the daemon called these outside the task role's KCL grants"
