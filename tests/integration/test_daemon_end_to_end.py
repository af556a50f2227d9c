"""The real path: table writes -> local bridge -> LocalStack Kinesis -> the real Java KCL
MultiLangDaemon -> record_processor.py -> Firehose (moto) -> S3, checkpoints in the lease
table (moto). Nothing here is faked."""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from boto3.dynamodb.types import TypeSerializer

from orders_cdc.local.orders import OrderDemo
from orders_cdc.local.runner import LocalRun, LocalRunConfig, wait_until
from orders_cdc.local.stack import PROJECT_ROOT, LocalStackConfig, free_port
from processors.analytics import flatten

pytestmark = pytest.mark.integration
ROOT = PROJECT_ROOT / ".local" / "test-e2e"


@pytest.fixture(scope="module")
def local_run():
    cfg = LocalRunConfig(stack=LocalStackConfig(root=ROOT, moto_port=free_port(), localstack_port=free_port()))
    run = LocalRun(cfg)
    started = time.monotonic()
    run.start()
    run.start_seconds = time.monotonic() - started
    # Warm-up: the first change goes through once the daemon holds its leases, so the
    # timings below measure the steady state, not lease acquisition.
    ddb, ser = run.client("dynamodb"), TypeSerializer()
    warm = OrderDemo(seed=1, prefix="warm").step()[1]
    ddb.put_item(TableName=cfg.names.orders_table, Item={k: ser.serialize(v) for k, v in warm.items()})
    wait_until(lambda: read_events(run), 240, 0.5, "the first change to reach the processor")
    run.first_change_seconds = time.monotonic() - started
    try:
        yield run
    finally:
        run.stop()


def read_events(run: LocalRun) -> list[dict]:
    s3, bucket = run.client("s3"), run.cfg.names.analytics_bucket
    events = []
    for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        # parse_float=Decimal: numbers are compared exactly, never through float
        events += [json.loads(line, parse_float=Decimal) for line in body.splitlines() if line.strip()]
    return [e for e in events if e.get("record_type", "analytics") == "analytics"]


def lease_checkpoints(run: LocalRun) -> dict[str, str]:
    items = run.client("dynamodb").scan(TableName=run.cfg.application, ConsistentRead=True)["Items"]
    return {i["leaseKey"]["S"]: i["checkpoint"]["S"] for i in items
            if i.get("entityType", {}).get("S", "LEASE") == "LEASE" and "checkpoint" in i}


def test_every_change_reaches_the_processor_exactly_and_checkpoints_advance(local_run):
    run = local_run
    ddb, ser = run.client("dynamodb"), TypeSerializer()
    demo = OrderDemo(seed=11, prefix="e2e")
    written: list[tuple[dict, float]] = []
    for _ in range(120):
        _, item = demo.step()
        ddb.put_item(TableName=run.cfg.names.orders_table, Item={k: ser.serialize(v) for k, v in item.items()})
        written.append((item, time.time()))
        time.sleep(0.02)

    def all_arrived():
        events = read_events(run)
        return events if len(events) >= len(written) + 1 else None

    events = [e for e in wait_until(all_arrived, 180, 1.0, "analytics events") if not e["keys"]["order_id"].startswith("warm")]
    assert len(events) == len(written), "every change once: nothing lost, nothing doubled"

    # Exactly as written: the processor's image of each change equals the item put, value
    # for value (Decimals exact), in the order the writes happened for each order.
    by_order: dict[str, list[dict]] = {}
    for event in sorted(events, key=lambda e: (e["shard_id"], int(e["sequence_number"]))):
        by_order.setdefault(event["keys"]["order_id"], []).append(event)
    for item, _ in written:
        assert by_order[item["order_id"]], f"no event for {item['order_id']}"
        event = by_order[item["order_id"]].pop(0)
        assert event["item"] == flatten(item)
        assert event["event_name"] == ("INSERT" if item["status"] == "pending" else "MODIFY")
    assert all(not rest for rest in by_order.values())

    # One item's changes stay on one shard (the partition key is the item key), and the
    # stream spreads orders over both shards.
    shards_of = {}
    for event in events:
        shards_of.setdefault(event["keys"]["order_id"], set()).add(event["shard_id"])
    assert all(len(s) == 1 for s in shards_of.values())
    assert len({e["shard_id"] for e in events}) == 2

    # Checkpoints reach the last record of each shard (the 5 s cadence lands on an idle
    # shard's empty batch).
    last = {}
    for event in events:
        last[event["shard_id"]] = max(last.get(event["shard_id"], 0), int(event["sequence_number"]))

    def caught_up():
        cps = lease_checkpoints(run)
        return all(cps.get(shard, "").isdigit() and int(cps[shard]) >= seq for shard, seq in last.items())

    wait_until(caught_up, 60, 1.0, "checkpoints to reach the last record of each shard")

    write_time = {(item["order_id"], item["status"]): t for item, t in written}
    lags = sorted(
        datetime.fromisoformat(e["processed_at"].replace("Z", "+00:00")).timestamp() - write_time[(e["keys"]["order_id"], e["item"]["status"])]
        for e in events
    )
    print(f"\nE2E: {len(events)} changes; stack+daemon start {run.start_seconds:.1f}s, first change processed at {run.first_change_seconds:.1f}s; "
          f"write->processed p50 {statistics.median(lags):.3f}s, p95 {lags[int(len(lags) * 0.95) - 1]:.3f}s, max {lags[-1]:.3f}s")


def test_no_stdout_pollution_and_child_logs_are_json(local_run):
    """The daemon log holds the children's stderr lines verbatim: each must be one JSON object."""
    log_path = local_run.daemons[0].log_path
    child_lines = [l for l in log_path.read_text().splitlines() if '"component": "processor"' in l or l.startswith('{"_aws"')]
    assert child_lines, "the children logged nothing"
    for line in child_lines:
        json.loads(line)
    assert "Skipping unexpected line on STDOUT" not in log_path.read_text()
