"""The live summary of `make run-local`: what the consumer did, read back from the local
stack itself (S3, SES, SQS, DynamoDB), not from the consumer's own counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from statistics import median

import orjson
from rich.table import Table

from orders_cdc.local.resources import ResourceNames
from processors.replication import DELETED


@dataclass
class Snapshot:
    orders_written: int = 0
    per_shard: Counter = field(default_factory=Counter)
    event_types: Counter = field(default_factory=Counter)
    emails: int = 0
    refunds: int = 0
    dead_letters: int = 0
    inventory_moves: int = 0
    orders_in_table: int = 0
    orders_in_replica: int = 0  # live copies (tombstones not counted)
    lag_p50_s: float | None = None
    lag_max_s: float | None = None


class Summary:
    def __init__(self, clients, names: ResourceNames):
        self.c = clients  # dict service -> boto3 client
        self.names = names
        self._seen_keys: set[str] = set()
        self._per_shard: Counter = Counter()
        self._types: Counter = Counter()
        self._lags: list[float] = []

    def _read_analytics(self) -> None:
        s3 = self.c["s3"]
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.names.analytics_bucket):
            for obj in page.get("Contents", []):
                if obj["Key"] in self._seen_keys:
                    continue
                self._seen_keys.add(obj["Key"])
                body = s3.get_object(Bucket=self.names.analytics_bucket, Key=obj["Key"])["Body"].read()
                written = obj["LastModified"].astimezone(timezone.utc)
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    event = orjson.loads(line)
                    if event.get("record_type") != "analytics":
                        continue  # audit entries share the bucket
                    self._per_shard[event.get("shard_id")] += 1
                    self._types[event.get("event_type")] += 1
                    created = datetime.fromisoformat(event["created_at"].replace("Z", "+00:00"))
                    self._lags.append(max(0.0, (written - created).total_seconds()))

    def _queue_depth(self, name: str) -> int:
        sqs = self.c["sqs"]
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def _count(self, table: str, **kwargs) -> int:
        """Items in `table` (every page: a scan counts at most 1 MB of items per call)."""
        count = 0
        while True:
            page = self.c["dynamodb"].scan(TableName=table, Select="COUNT", **kwargs)
            count += page["Count"]
            if "LastEvaluatedKey" not in page:
                return count
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def snapshot(self, orders_written: int) -> Snapshot:
        self._read_analytics()
        recent = self._lags[-200:]
        return Snapshot(
            orders_written=orders_written,
            per_shard=Counter(self._per_shard),
            event_types=Counter(self._types),
            emails=int(self.c["ses"].get_send_quota().get("SentLast24Hours", 0)),
            refunds=self._queue_depth(self.names.refund_queue),
            dead_letters=self._queue_depth(self.names.dlq_queue),
            inventory_moves=self._count(self.names.inventory_table),
            orders_in_table=self._count(self.names.orders_table),
            orders_in_replica=self._count(self.names.replica_table, FilterExpression=f"attribute_not_exists({DELETED})"),
            lag_p50_s=median(recent) if recent else None,
            lag_max_s=max(recent) if recent else None,
        )


def render(snap: Snapshot, elapsed_s: float) -> Table:
    table = Table(title=f"orders-cdc local demo — {elapsed_s:.0f}s (Ctrl-C stops everything)", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("table writes (demo generator)", str(snap.orders_written))
    for shard, count in sorted(snap.per_shard.items(), key=lambda kv: str(kv[0])):
        table.add_row(f"  consumed from {shard}", str(count))
    for kind, count in sorted(snap.event_types.items()):
        table.add_row(f"  analytics {kind}", str(count))
    table.add_row("emails sent (SES)", str(snap.emails))
    table.add_row("refund requests (SQS)", str(snap.refunds))
    table.add_row("inventory rows", str(snap.inventory_moves))
    table.add_row("orders: in the table / in the replica", f"{snap.orders_in_table} / {snap.orders_in_replica}")
    table.add_row("dead letters", str(snap.dead_letters))
    lag = "—" if snap.lag_p50_s is None else f"p50 {snap.lag_p50_s:.2f}s, max {snap.lag_max_s:.2f}s"
    table.add_row("lag, write → analytics (last 200)", lag)
    return table


def one_line(snap: Snapshot, elapsed_s: float) -> str:
    shards = " ".join(f"{str(k)[-4:]}={v}" for k, v in sorted(snap.per_shard.items(), key=lambda kv: str(kv[0])))
    lag = "-" if snap.lag_p50_s is None else f"{snap.lag_p50_s:.2f}s/{snap.lag_max_s:.2f}s"
    return (f"[{elapsed_s:5.0f}s] writes={snap.orders_written} consumed[{shards}] emails={snap.emails} "
            f"refunds={snap.refunds} inventory_rows={snap.inventory_moves} "
            f"orders/replica={snap.orders_in_table}/{snap.orders_in_replica} dlq={snap.dead_letters} lag p50/max={lag}")
